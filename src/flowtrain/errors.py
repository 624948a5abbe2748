"""User-facing errors.

Every problem a user can fix (bad path, bad config, corrupt checkpoint...) is a FlowtrainError whose message
names the bad thing and what to do about it. The CLI turns it into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class FlowtrainError(Exception):
    """A problem with the user's input, described in one line with a suggested fix."""


class ConfigError(FlowtrainError):
    """The config tree (file or override) is invalid."""


class DataError(FlowtrainError):
    """A corpus, dataset directory or tokenizer cannot be used."""


class CheckpointError(FlowtrainError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class InteropError(FlowtrainError):
    """A model cannot go to, or come from, another library's format (transformers: docs/interop.md)."""


class DivergedError(FlowtrainError):
    """A model's outputs are not finite numbers: its weights diverged (NaN or inf)."""


class RunDirError(FlowtrainError):
    """The run directory cannot be written: another process holds it, or it is not writable."""


class GuardStop(FlowtrainError):
    """The stability guard stopped training (rollback budget exhausted, or a detector set to stop)."""

    exit_code = 3


class StructureError(FlowtrainError):
    """What was said about a model's structure (blocks=, head=) does not match the model."""


class NotAvailable(FlowtrainError):
    """A statistic the microscope cannot measure on this model (or did not measure at this step)."""


class MissingDependency(FlowtrainError, ImportError):
    """An optional package an integration needs is not installed."""
