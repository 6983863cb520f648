"""Job records and their states: pure logic, like the model table (no torch, no processes).

A job goes ``running`` -> ``done`` | ``failed`` | ``cancelled``; nothing else is legal, and a
finished job never changes again.  (Queued, pausing and paused come with the training jobs.)
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from llmctl.errors import InvalidState


class JobState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


LEGAL: dict[JobState, set[JobState]] = {
    JobState.RUNNING: {JobState.DONE, JobState.FAILED, JobState.CANCELLED},
}


@dataclass
class Job:
    """One job as the daemon tracks it.  ``process`` is whatever runs it (the runner's worker;
    anything with a ``pid``), ``blobs`` the blobs it added to the store so far."""
    id: int
    kind: str
    target: str                    # what it makes, e.g. the model name
    uid: int | None
    state: JobState = JobState.RUNNING
    started: float = field(default_factory=time.time)
    progress: dict = field(default_factory=dict)
    error: str = ""
    process: object = None
    blobs: set = field(default_factory=set)

    def transition(self, new: JobState) -> None:
        """Move to ``new``; InvalidState unless LEGAL allows it from the current state."""
        if new not in LEGAL.get(self.state, set()):
            raise InvalidState(f"job {self.id} cannot go from {self.state.value} to {new.value}")
        self.state = new

    def finished(self) -> bool:
        return not LEGAL.get(self.state)

    def row(self) -> dict:
        """The job as ``ps`` and ``status`` show it."""
        return {"id": self.id, "kind": self.kind, "target": self.target, "uid": self.uid,
                "state": self.state.value, "started": self.started, "progress": self.progress,
                "pid": getattr(self.process, "pid", None), "error": self.error}
