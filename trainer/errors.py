"""Errors a user can act on. Each names the field or file at fault and what to do."""


class TrainerError(Exception):
    """Base class: anything raised on purpose for the user to read."""


class JobError(TrainerError):
    """The job file (or the node inputs that build one) is invalid.

    `field` is the dotted path of the offending key, e.g. ``network.alpha_schedule.conv_alpha_phases.balance.alpha``.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class DatasetError(TrainerError):
    """A dataset file or folder cannot be used. `path` is the file or folder at fault."""

    def __init__(self, path, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{path}: {message}")


class ModelError(TrainerError):
    """The model folder, hub id or file does not hold the family the job asks for."""


class CheckpointError(TrainerError):
    """A checkpoint cannot be resumed into this job."""


class InterruptedTraining(TrainerError):
    """Training was stopped on request; a checkpoint and the partial LoRA were saved."""

    def __init__(self, step: int, lora_path=None, checkpoint_path=None):
        self.step = step
        self.lora_path = lora_path
        self.checkpoint_path = checkpoint_path
        super().__init__(f"training interrupted at step {step}")
