"""What the app serves: from flags, then the environment, then defaults (the demo dataset, the best run)."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .hardware import on_zerogpu

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "data" / "demo"
DETECTOR_LOOK_SECONDS = 10.0       # how long a look for a detector run in the runs folder holds
_DETECTOR_SEEN: dict[str, tuple[float, str | None]] = {}  # runs folder -> (when it was looked at, the detector found)
CONFIGURED = "(configured model)"   # stands for settings.checkpoint in the Model box: its path stays on the server


@dataclass
class AppSettings:
    data: str                   # dataset root
    checkpoint: str | None      # run directory, checkpoint file, or None (the run whose best.pt is best on val)
    runs_dir: str
    public: bool                # a Hugging Face Space or a --share link: strangers can reach it
    allow_training: bool        # the owner's override for public mode (CARAPP_ALLOW_TRAINING=1)
    auth: tuple[str, str] | None = None
    allow_slow_cam: bool = False  # the owner's override for public mode (CARAPP_SLOW_CAM=1): ScoreCAM and friends
    queue_size: int = 32          # requests waiting in the queue at most; more are refused at once
    queue_per_client: int = 8     # public mode: requests of one client waiting or running (CARAPP_QUEUE_PER_CLIENT)
    queue_per_pool: int = 2       # ... of them in one pool of workers, e.g. predictions (CARAPP_QUEUE_PER_POOL)
    behind_proxy: bool = False    # a Space: the visitor's address is the one its proxy adds to X-Forwarded-For
    clean_cache: bool = True      # delete uploads and answers older than two hours (and the app's own at exit)
    analyze_max_files: int = 500  # public mode: one analysis reads at most this many photos (zip members too) ...
    analyze_max_mb: int = 200     # ... and megabytes sent (CARAPP_ANALYZE_MAX_FILES / _MB raise them)
    analyses_max_hours: float = 24  # public mode: analyses older than this are deleted (CARAPP_ANALYSES_MAX_HOURS) ...
    analyses_max_mb: float = 2000   # ... and the oldest while all of them take more (CARAPP_ANALYSES_MAX_MB)
    first_model: bool = True      # public, no model, demo data: train the demo preset at start (CARAPP_FIRST_MODEL=0)
    detector: str | None = None   # --detector / CARAPP_DETECTOR: a detector run, its checkpoint, coco, or none;
                                  # unset: the newest detector run in runs_dir, if there is one
    zerogpu: bool = False         # a ZeroGPU Space (SPACES_ZERO_GPU): GPU calls only, no training (see hardware)

    @property
    def detector_source(self) -> str | None:
        """The detector Predict and Analyze find cars with, or None (one answer per photo). The runs folder is looked
        at once per DETECTOR_LOOK_SECONDS: every prediction asks, and a busy app must not rescan for each."""
        if self.detector:
            return None if self.detector == "none" else self.detector
        seen, found = _DETECTOR_SEEN.get(self.runs_dir, (0.0, None))
        if time.monotonic() - seen > DETECTOR_LOOK_SECONDS:
            from ..runs import newest_detector
            newest = newest_detector(self.runs_dir)
            found = str(newest) if newest else None
            _DETECTOR_SEEN[self.runs_dir] = (time.monotonic(), found)
        return found

    @property
    def training_enabled(self) -> bool:
        """Training and evaluation jobs: subprocesses, which never get a ZeroGPU Space's GPU."""
        return not self.zerogpu and (not self.public or self.allow_training)

    @property
    def training_off(self) -> str:
        """Why training is off, and what the owner can do instead."""
        from .hardware import TRAINING_OFF
        return TRAINING_OFF if self.zerogpu else ("Training is turned off in this public app. Its owner can allow "
                                                  "it with `CARAPP_ALLOW_TRAINING=1` (and `CARAPP_AUTH=user:password`).")

    @property
    def paths_editable(self) -> bool:
        """Free-form server paths only for a private app."""
        return not self.public

    @property
    def slow_cam_enabled(self) -> bool:
        """CAM methods with a backward pass or many forward passes: seconds to minutes of CPU per request."""
        return not self.public or self.allow_slow_cam

    def redact(self, text: str) -> str:
        """In public mode, the owner's folders in a message become short names: strangers learn no server paths."""
        if not self.public:
            return text
        folders = {self.data: "<dataset>", self.runs_dir: "<runs>", self.checkpoint or "": "<model>",
                   self.detector or "": "<detector>",
                   str(REPO): "<app>", tempfile.gettempdir(): "<tmp>", str(Path.home()): "<home>"}
        for folder, name in sorted(folders.items(), key=lambda kv: -len(kv[0])):
            if len(folder) > 1:
                text = text.replace(str(Path(folder).resolve()), name).replace(folder, name)
        return text

    @property
    def is_demo_data(self) -> bool:
        return Path(self.data).resolve() == DEMO_DATA.resolve()

    @property
    def is_demo_like(self) -> bool:
        """The built-in demo dataset, or another copy of the synthetic demo."""
        from ..dataset.demo import is_demo_dataset
        return self.is_demo_data or is_demo_dataset(self.data)


def resolve_settings(data: str | None = None, checkpoint: str | None = None, runs_dir: str | None = None,
                     share: bool = False, detector: str | None = None) -> AppSettings:
    auth = os.environ.get("CARAPP_AUTH")
    user, _, password = auth.partition(":") if auth else ("", "", "")
    return AppSettings(
        data=data or os.environ.get("CARAPP_DATA") or str(DEMO_DATA),
        checkpoint=checkpoint or os.environ.get("CARAPP_CHECKPOINT") or None,
        runs_dir=runs_dir or os.environ.get("CARAPP_RUNS_DIR") or str(REPO / "checkpoints"),
        public=share or bool(os.environ.get("SPACE_ID")),
        allow_training=os.environ.get("CARAPP_ALLOW_TRAINING") == "1",
        auth=(user, password) if user and password else None,
        allow_slow_cam=os.environ.get("CARAPP_SLOW_CAM") == "1",
        queue_size=int(os.environ.get("CARAPP_QUEUE_SIZE") or 32),
        queue_per_client=int(os.environ.get("CARAPP_QUEUE_PER_CLIENT") or 8),
        queue_per_pool=int(os.environ.get("CARAPP_QUEUE_PER_POOL") or 2),
        behind_proxy=bool(os.environ.get("SPACE_ID")),
        analyze_max_files=int(os.environ.get("CARAPP_ANALYZE_MAX_FILES") or 500),
        analyze_max_mb=int(os.environ.get("CARAPP_ANALYZE_MAX_MB") or 200),
        analyses_max_hours=float(os.environ.get("CARAPP_ANALYSES_MAX_HOURS") or 24),
        analyses_max_mb=float(os.environ.get("CARAPP_ANALYSES_MAX_MB") or 2000),
        first_model=os.environ.get("CARAPP_FIRST_MODEL", "1") != "0",
        detector=detector or os.environ.get("CARAPP_DETECTOR") or None,
        zerogpu=on_zerogpu(),
    )


def ensure_data(settings: AppSettings) -> str:
    """The built-in demo dataset is generated on first use (a few seconds), so start-up stays quick."""
    if settings.is_demo_data and not (DEMO_DATA / "data" / "image").is_dir():
        from ..dataset.demo import make_demo_dataset
        make_demo_dataset(DEMO_DATA, replace=True)  # a half-written one (killed) is redone
    return settings.data
