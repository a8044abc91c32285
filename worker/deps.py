"""What the job runner works with: its collaborators (`RunnerDeps`: sessions, storage, the engine,
the caches and limits), the engine as it sees it (`Segments`), and `TransientError` (the database or
another dependency is down: the task retries). Built by worker/bootstrap.py from the settings; tests
and benchmarks build their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from shared import jobs as jobstate
from shared.fetch import FetchPolicy
from shared.followups import Effects
from shared.storage import ObjectStorage
from worker.decoders import DecoderCache
from worker.engine.refine import PixelBudget
from worker.engine.types import SegmentRequest, SegmentResult
from worker.examples import ExampleCache
from worker.leases import LeaseKeeper
from worker.outputs import InstanceRules
from worker.stops import CancelWatch

# The smallest decode that still feeds the model at full quality, when the segmenter doesn't say
# (`input_size`): CLIPSeg's input is 352x352, and a DCT-scaled JPEG at least that large is then
# resized on the device like any other image.
MODEL_INPUT = (352, 352)


class Segments(Protocol):
    """The engine as the runner sees it (worker.engine.Segmenter); it may also carry `model_revision`."""

    def run(self, request: SegmentRequest) -> SegmentResult: ...


class TransientError(Exception):
    """The database or another dependency is down; the task should be retried later."""


def _no_stage(stage: str, seconds: float) -> None:
    pass


def _no_finish(status: str, code: str | None, seconds: float) -> None:
    pass


def _no_follow_up(effects: Effects) -> None:
    pass


@dataclass
class RunnerDeps:
    sessions: sessionmaker[Session]
    storage: ObjectStorage
    segmenter: Callable[[], Segments]  # built lazily: the model loads once, on first use
    fetch_policy: FetchPolicy
    max_pixels: int
    model_id: str
    on_stage: Callable[[str, float], None] = _no_stage  # (fetch|decode|infer|matte|encode|upload, seconds)
    on_finish: Callable[[str, str | None, float], None] = _no_finish  # (status, error code, seconds)
    lease_s: float = 60.0
    leases: LeaseKeeper | None = None  # the process's heartbeat; None: leases are not renewed
    # after the commit that finished a job: send its deliveries, finalize its batch (followups.after_commit)
    follow_up: Callable[[Effects], None] = _no_follow_up
    # decode JPEGs at a reduced DCT scale (never below MODEL_INPUT) when no output needs full pixels
    reduced_decode: bool = True
    # visual-prompt examples by URL, fetched once a while per process (worker/examples.py)
    examples: ExampleCache = field(default_factory=ExampleCache)
    # tenants' fine-tuned decoders, by revision (worker/decoders.py)
    decoders: DecoderCache = field(default_factory=DecoderCache)
    # refine: matting - the pixels a job's mattes may solve in all (settings.matting_max_pixels), and
    # those the process's job threads may be solving at once (settings.matting_process_pixels)
    matting_max_pixels: int = 4_000_000
    matting_budget: PixelBudget = field(default_factory=lambda: PixelBudget(8_000_000))
    # the jobs canceled meanwhile, heard on Postgres' channel (worker/stops.py): a stage boundary asks
    # the database only for a job it heard of; None: every boundary asks
    cancels: CancelWatch | None = None
    # a job taken this often without reaching a final state fails `attempts_exhausted` when next taken
    max_attempts: int = jobstate.NO_ATTEMPTS_CAP
    # outputs: instances - a component's least share of the image, and the most per label
    instances: InstanceRules = field(default_factory=InstanceRules)
