"""Error types shared by the daemon and its clients.

Every error that crosses the wire carries a stable numeric code and a stable string name.
The daemon raises these; the client rebuilds the same class from the code; the CLI maps each
class to a sysexits-style exit status.  Codes are part of protocol v1: never renumber.
"""
from __future__ import annotations

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78


class LlmosdError(Exception):
    """Base class. ``code`` and ``name`` are stable; ``hint`` tells the user what to do."""

    code = 1000
    name = "internal"
    exit_status = EX_SOFTWARE
    default_hint = ""

    MAX_TEXT = 2000     # an error never echoes more of the user's input than this

    def __init__(self, message: str, hint: str | None = None):
        message = _cap(str(message), self.MAX_TEXT)
        super().__init__(message)
        self.message = message
        self.hint = _cap(self.default_hint if hint is None else str(hint), self.MAX_TEXT)

    def to_wire(self) -> dict:
        return {"code": self.code, "name": self.name, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        return self.message


def _cap(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text) - n} more characters)"


class BadRequest(LlmosdError):
    """The message could not be decoded or lacks required fields."""
    code, name, exit_status = 1, "bad_request", EX_PROTOCOL


class UnsupportedVersion(LlmosdError):
    code, name, exit_status = 2, "unsupported_version", EX_PROTOCOL
    default_hint = "upgrade llmctl or llmosd so both speak the same protocol major version"


class UnknownType(LlmosdError):
    code, name, exit_status = 3, "unknown_type", EX_PROTOCOL


class InvalidArgument(LlmosdError):
    code, name, exit_status = 4, "invalid_argument", EX_DATAERR


class TooLarge(LlmosdError):
    code, name, exit_status = 5, "too_large", EX_DATAERR


class ModelNotFound(LlmosdError):
    code, name, exit_status = 10, "model_not_found", EX_NOINPUT
    default_hint = "run 'llmctl ls' to see the models in the store"


class AlreadyExists(LlmosdError):
    code, name, exit_status = 11, "already_exists", EX_CANTCREAT


class Busy(LlmosdError):
    """The target is in use (e.g. unloading an instance with active requests)."""
    code, name, exit_status = 12, "busy", EX_TEMPFAIL


class InstanceNotFound(LlmosdError):
    code, name, exit_status = 13, "instance_not_found", EX_NOINPUT
    default_hint = "run 'llmctl ps' to see the loaded instances"


class JobNotFound(LlmosdError):
    code, name, exit_status = 15, "job_not_found", EX_NOINPUT
    default_hint = "run 'llmctl jobs --all' to see the jobs"


class InvalidState(LlmosdError):
    """An illegal state transition was asked for (a daemon bug or a race the caller lost)."""
    code, name, exit_status = 14, "invalid_state", EX_TEMPFAIL


class LoadFailed(LlmosdError):
    code, name, exit_status = 20, "load_failed", EX_SOFTWARE


class OutOfMemory(LlmosdError):
    code, name, exit_status = 21, "out_of_memory", EX_TEMPFAIL
    default_hint = "unload another model ('llmctl ps', 'llmctl unload ID') or use a smaller one"


class StoreCorrupt(LlmosdError):
    code, name, exit_status = 22, "store_corrupt", EX_IOERR


class JobFailed(LlmosdError):
    code, name, exit_status = 23, "job_failed", EX_SOFTWARE


class ShuttingDown(LlmosdError):
    code, name, exit_status = 30, "shutting_down", EX_UNAVAILABLE
    default_hint = "the daemon is stopping; start it again and retry"


class Cancelled(LlmosdError):
    """Ended by someone else (a forced unload, a cancelled job).  Exit 75, not 130: 130 says the
    user pressed Ctrl-C here, which the CLI reports by itself."""
    code, name, exit_status = 31, "cancelled", EX_TEMPFAIL


class PermissionDenied(LlmosdError):
    code, name, exit_status = 32, "permission_denied", EX_NOPERM


class Internal(LlmosdError):
    code, name, exit_status = 40, "internal", EX_SOFTWARE
    default_hint = "this is a bug in llmosd; the daemon log has the traceback"


# Client-side only: never sent by the daemon.
class DaemonUnavailable(LlmosdError):
    code, name, exit_status = 50, "daemon_unavailable", EX_UNAVAILABLE


class Timeout(LlmosdError):
    code, name, exit_status = 51, "timeout", EX_TEMPFAIL


class ConfigError(LlmosdError):
    code, name, exit_status = 52, "config_error", EX_CONFIG


_BY_CODE = {cls.code: cls for cls in LlmosdError.__subclasses__()}
_BY_CODE[LlmosdError.code] = LlmosdError


def from_wire(body: dict) -> LlmosdError:
    """Rebuild the typed exception for an ``error`` body (unknown codes become LlmosdError)."""
    cls = _BY_CODE.get(body.get("code"), LlmosdError)
    err = cls(str(body.get("message", "unknown error")), hint=str(body.get("hint") or ""))
    if cls is LlmosdError:
        err.code = body.get("code", LlmosdError.code)
        err.name = str(body.get("name", "unknown"))
    return err


def all_errors() -> list[type[LlmosdError]]:
    """Every error class, ordered by code (used by docs and tests)."""
    return sorted(_BY_CODE.values(), key=lambda c: c.code)
