"""Training an adapter: the trainer (trainer.py), its lean step (step.py) and the levers that make it fast."""

from lora_pipeline.ml.training.step import TrainingDivergedError
from lora_pipeline.ml.training.trainer import (
    StepOptions,
    TrainResult,
    lora_config,
    step_options,
    train_adapter,
    training_labels,
)

__all__ = [
    "StepOptions",
    "TrainResult",
    "TrainingDivergedError",
    "lora_config",
    "step_options",
    "train_adapter",
    "training_labels",
]
