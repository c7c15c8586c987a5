"""Typed errors: each names the culprit (key, file, rank) and says how to fix it."""


class MpimlError(Exception):
    """Base class: an error the user can act on, printed without a traceback by `train`.

    `shared` is set when every rank raised the same error from one agreed verdict: the job
    can then end cleanly on all ranks instead of being aborted.
    """

    shared: bool = False
    exit_code: int = 2  # what the job exits with when every rank agreed on this error

    def agreed(self) -> "MpimlError":
        """Mark as a verdict every rank reached together (so the job may end cleanly)."""
        self.shared = True
        return self


def unwinding_alone(exc: BaseException | None) -> bool:
    """True when `exc` ends this rank only, not as an error every rank agreed on.

    Cleanup on that path must not wait for the other ranks: they may be blocked in a
    collective this rank will never join, and the job is about to be aborted anyway.
    """
    return exc is not None and not (isinstance(exc, MpimlError) and exc.shared)


class ConfigError(MpimlError, ValueError):
    """A config key, value or combination is invalid."""


class DataError(MpimlError, ValueError):
    """A dataset is missing, malformed or too small for the job."""


class CheckpointError(MpimlError, RuntimeError):
    """A checkpoint cannot be written, or one that was read is missing or corrupt."""


class CommError(MpimlError, RuntimeError):
    """Ranks disagree (layout, lengths, launcher) or a collective cannot proceed."""


class NonFiniteLossError(MpimlError, FloatingPointError):
    """The loss became NaN or infinite under `train.nonfinite: abort` (exit code 3)."""

    exit_code = 3
