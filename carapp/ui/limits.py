"""Shares of the server per visitor, as ASGI middleware on the app Gradio builds (`launch(app_kwargs=...)`).

- A fair share of the request queue: one client with `per_client` requests waiting or running in Gradio's queue
  is refused its next one at once (429, with a message), so that one client's flood cannot fill the queue that
  every visitor shares. A client is its address; behind a Space's proxy, the address that proxy appended to
  X-Forwarded-For (the rightmost public one: whatever a client wrote itself stands to its left).
- Upload requests no larger than what an analysis may send: a larger one, or one that does not say its size, is
  refused before Gradio stores a byte of it (Gradio limits each file, never a request: 1,000 files of 10 MB were
  stored from one request).

Both read Gradio's own request queue, whose layout is Gradio's (tests/test_public_app.py fails if it changes).
"""
from __future__ import annotations

import ipaddress
import json

from starlette.datastructures import Headers

EVENT_ROUTES = ("/gradio_api/queue/join", "/gradio_api/call/")  # every route that puts an event in the queue
UPLOAD_ROUTE = "/gradio_api/upload"
DRAIN_BYTES = 64 * 2**20  # a refused body is read this far, so that a client that sends it all sees the answer


def client_of(headers: Headers, peer: str | None, behind_proxy: bool) -> str:
    """The address a request comes from."""
    if behind_proxy:
        hops = [h.strip() for h in ",".join(headers.getlist("x-forwarded-for")).split(",") if h.strip()]
        for hop in reversed(hops):
            if _is_public(hop):
                return hop
    return peer or "unknown"


def _is_public(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local)


def queued_by(queue, client: str, behind_proxy: bool) -> int:
    """Events of this client waiting in Gradio's queue or being processed."""
    events = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)]
    events += [e for job in list(queue.active_jobs) if job for e in job]
    return sum(1 for e in events if e.request is not None and client == client_of(
        e.request.headers, e.request.client.host if e.request.client else None, behind_proxy))


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive, budget: float) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


class FairQueue:
    """At most `per_client` requests of one client in the queue at once."""

    def __init__(self, app, per_client: int, behind_proxy: bool):
        self.app, self.per_client, self.behind_proxy = app, per_client, behind_proxy
        self.joining: dict[str, int] = {}  # joins of a client on their way into the queue

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not any(r in scope["path"] for r in EVENT_ROUTES):
            return await self.app(scope, receive, send)  # page loads, uploads, the event streams: untouched
        peer = scope.get("client")
        client = client_of(Headers(scope=scope), peer[0] if peer else None, self.behind_proxy)
        # counted and reserved with no await between: two joins racing cannot both take the last place
        waiting = queued_by(scope["app"].get_blocks()._queue, client, self.behind_proxy) + self.joining.get(client, 0)
        if waiting >= self.per_client:
            return await _refuse(send, 429, f"You have {waiting} requests waiting or running already (at most "
                                            f"{self.per_client} at a time): wait for them, then try again.")
        self.joining[client] = self.joining.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.joining[client] -= 1
            if not self.joining[client]:
                del self.joining[client]


class UploadLimit:
    """Upload requests of at most `max_bytes`, refused before anything is stored."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith(UPLOAD_ROUTE):
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if not length.isdigit():  # browsers and gradio_client say how large an upload is; a chunked one is refused
            return await _refuse(send, 411, "An upload must say its size (Content-Length).")
        if int(length) <= self.max_bytes:  # the server never hands on more than Content-Length bytes
            return await self.app(scope, receive, send)
        await _drain(receive, DRAIN_BYTES)
        await _refuse(send, 413, f"An upload may send at most {self.max_bytes / 2**20:.0f} MB at a time.")
