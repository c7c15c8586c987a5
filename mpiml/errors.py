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
