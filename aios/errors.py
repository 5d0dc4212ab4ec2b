"""The exception hierarchy. Every syscall ends with a result or one of these.

Each class carries a stable ``code`` so the edges (CLI exit codes, HTTP status codes) can map
them without string matching. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

from typing import ClassVar


class AIOSError(Exception):
    """Base of every error aios raises on purpose."""

    code: ClassVar[str] = "aios_error"


class ConfigError(AIOSError):
    """The configuration is invalid (reported before anything starts)."""

    code = "config_error"


class ModelNotFound(AIOSError):
    """A model file or model name could not be resolved."""

    code = "model_not_found"


class ModelLoadError(AIOSError):
    """llama.cpp could not load a model file or create a context for it."""

    code = "model_load_error"


class IncompatibleBuild(ModelLoadError):
    """The installed llama.cpp would crash on this CPU (compiled for instructions it lacks, or
    with AMX kernels where AMX faults); the message names the command that rebuilds it."""

    code = "incompatible_build"


class InvalidRequest(AIOSError):
    """A syscall's parameters are invalid; nothing was queued."""

    code = "invalid_request"


class ContextOverflow(InvalidRequest):
    """The prompt (plus the requested output) does not fit the model's context."""

    code = "context_overflow"


class Overloaded(AIOSError):
    """A queue or a limit is full; retry after ``retry_after`` seconds instead of queueing
    without bound."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(AIOSError):
    """No credential, or one the kernel does not know."""

    code = "unauthenticated"


class PermissionDenied(AIOSError):
    """The caller's identity may not do this."""

    code = "permission_denied"


class NotFound(AIOSError):
    """No such object (or none the caller may see)."""

    code = "not_found"


class QuotaExceeded(AIOSError):
    """The agent used up its token quota; ``retry_after`` says when it has room again."""

    code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(AIOSError):
    """The syscall did not finish before its deadline; its resources were released."""

    code = "deadline_exceeded"


class SyscallCancelled(AIOSError):
    """The syscall was cancelled by the kernel (not by its caller)."""

    code = "cancelled"


class KernelShutdown(AIOSError):
    """The kernel shut down while the syscall was queued or running."""

    code = "kernel_shutdown"


class ReplayDiverged(AIOSError):
    """A resumed agent's syscall differs from the one its journal recorded at that step (its
    code, task or inputs changed since it ran): the process fails instead of re-running it."""

    code = "replay_diverged"


class LeaseLost(AIOSError):
    """Another kernel holds this durable process now (this one could not renew its lease in
    time): it stops here, and the other resumes it from the journal."""

    code = "lease_lost"


class CoreError(AIOSError):
    """The LLM core failed while running the syscall (the core itself keeps serving)."""

    code = "core_error"


class EngineCrashed(CoreError):
    """The engine's process died in the middle of a step (an abort or a segfault in native
    code): the KV of every call on it is gone. ``slot`` is the sequence it was working on
    (``None``: a batch-wide call such as decode), ``key`` the context it was saving, if any. The
    core fails the call that crashed it, starts a fresh engine and runs the others again."""

    code = "engine_crashed"

    def __init__(self, message: str, *, slot: int | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.slot = slot
        self.key = key


class CoreUnavailable(CoreError):
    """The core cannot serve at all right now (its server is unreachable or stopped
    answering); a router resubmits the call to another core."""

    code = "core_unavailable"


class StorageError(AIOSError):
    """The database under memory and storage failed (it is down, or refused the change);
    nothing was changed."""

    code = "storage_error"


class StorageFull(AIOSError):
    """The write would take the agent past its storage quota (bytes or files); nothing was
    changed."""

    code = "storage_full"


class Conflict(AIOSError):
    """The object is not in a state that allows this (a file where a folder is needed, a
    target that already exists)."""

    code = "conflict"


class ToolError(AIOSError):
    """A tool failed (raised, or returned something unusable); the kernel and other tools are
    unaffected, and the message says what went wrong."""

    code = "tool_error"


class ToolTimeout(ToolError):
    """A tool ran past its timeout (or the call's deadline); it was stopped."""

    code = "tool_timeout"


class Unreachable(AIOSError):
    """The kernel could not be reached over HTTP (after the client's retries)."""

    code = "unreachable"


def error_classes() -> dict[str, type[AIOSError]]:
    """Every error class by its code (how clients map an error body back to a type)."""
    found: dict[str, type[AIOSError]] = {}
    stack: list[type[AIOSError]] = [AIOSError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return found
