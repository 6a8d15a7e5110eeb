"""Shares of the server per visitor, as ASGI middleware on the app Gradio builds (`launch(app_kwargs=...)`).

- A fair share of the request queue: one client with `per_client` requests waiting or running in Gradio's queue,
  or `per_pool` in one pool of workers, is refused its next one at once (429, with a message), so that one
  client's flood can neither fill the queue every visitor shares nor stand long in front of their predictions.
  A client is its address; behind a Space's proxy, the address that proxy appended to X-Forwarded-For (the
  rightmost public one: whatever a client wrote itself stands to its left).
- Upload requests no larger than what an analysis may send: a larger one, or one that does not say its size, is
  refused before Gradio stores a byte of it (Gradio limits each file, never a request: 1,000 files of 10 MB were
  stored from one request).

Both read Gradio's own request queue, whose layout is Gradio's (tests/test_public_shares.py fails if it changes).
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


def queued_by(queue, client: str, behind_proxy: bool) -> list[str]:
    """The pools (concurrency ids) of this client's events waiting in Gradio's queue or being processed."""
    events = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)]
    events += [e for job in list(queue.active_jobs) if job for e in job]
    return [e.fn.concurrency_id for e in events if e.request is not None and client == client_of(
        e.request.headers, e.request.client.host if e.request.client else None, behind_proxy)]


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
    """At most `per_client` requests of one client in the queue at once, and `per_pool` of them in one pool of
    workers (the predictions share one pool of 2): a client's own waiting requests, not the others', are what it
    waits behind."""

    def __init__(self, app, per_client: int, behind_proxy: bool, per_pool: int = 2):
        self.app, self.per_client, self.per_pool, self.behind_proxy = app, per_client, per_pool, behind_proxy
        self.joining: dict[tuple[str, str | None], int] = {}  # joins on their way into the queue, by client and pool

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not any(r in scope["path"] for r in EVENT_ROUTES):
            return await self.app(scope, receive, send)  # page loads, uploads, the event streams: untouched
        body = await _read_body(receive)
        if body is None:
            return await _refuse(send, 413, "A request to the queue may hold at most 1 MB.")
        blocks = scope["app"].get_blocks()
        peer = scope.get("client")
        client = client_of(Headers(scope=scope), peer[0] if peer else None, self.behind_proxy)
        pool = _pool_of(blocks, scope["path"], body)
        # counted and reserved with no await between: two joins racing cannot both take the last place
        mine = queued_by(blocks._queue, client, self.behind_proxy)
        waiting = len(mine) + sum(n for (c, _), n in self.joining.items() if c == client)
        in_pool = mine.count(pool) + self.joining.get((client, pool), 0)
        if waiting >= self.per_client or in_pool >= self.per_pool:
            return await _refuse(send, 429, f"You have {waiting} requests waiting or running already (at most "
                                            f"{self.per_client} at a time, {self.per_pool} of one kind): wait for "
                                            f"them, then try again.")
        key = (client, pool)
        self.joining[key] = self.joining.get(key, 0) + 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.joining[key] -= 1
            if not self.joining[key]:
                del self.joining[key]


MAX_JOIN_BYTES = 2**20  # a join names an event and its inputs; files travel by upload


async def _read_body(receive) -> bytes | None:
    """The whole request body, or None past MAX_JOIN_BYTES."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_JOIN_BYTES:
            return None
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """The body, handed on to Gradio as if it were read for the first time."""
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


def _pool_of(blocks, path: str, body: bytes) -> str | None:
    """The concurrency id of the event a join asks for: by fn_index (queue/join) or api name (call/NAME)."""
    if "/gradio_api/call/" in path:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        fn = next((f for f in blocks.fns.values() if f.api_name == name), None)
    else:
        try:
            index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            index = None
        fn = blocks.fns.get(index) if isinstance(index, int) else None
    return fn.concurrency_id if fn is not None else None


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
