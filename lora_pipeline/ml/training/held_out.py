"""Evaluation while training: the held-out loss every training.eval_steps, early stopping, the best adapter kept.

The figure is eval_report's `loss` (the mean over examples of each example's loss per response token, on the
same held-out examples), so the curve's last point and the report's adapter loss are one number, not two
definitions. transformers' own evaluation loop was not used: its eval_loss is a mean over batches, its best
model is a checkpoint written at every evaluation (here: a published copy in the store each time) and its
early stopping requires that best-model reload.

Resumable: the evaluations are in the Trainer's log history, which every checkpoint carries, and the best
weights so far are written into each checkpoint (BEST_WEIGHTS) before it is published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import pandas as pd

EVAL_LOSS = "eval_loss"  # the Trainer log key (and so the trackers' train/eval_loss)
BEST_WEIGHTS = "best_adapter.safetensors"


@dataclass(frozen=True)
class HeldOut:
    """The held-out examples scored while training, and how."""

    frame: "pd.DataFrame"  # scorable rows: input_ids, loss_mask
    pad_id: int
    batch_size: int


@dataclass
class EvaluationOutcome:
    """What the evaluations while training found: the curve, the best point, whether training stopped early."""

    history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_loss: float | None = None
    stopped_early_at: int | None = None
    published_step: int | None = None  # the step whose weights were saved: best_step with keep_best


def held_out_loss(model, held_out: HeldOut) -> float:
    """The per-example mean loss of the model on the held-out examples, leaving the model in the mode it was in."""
    from lora_pipeline.ml.evaluation.per_example import forward_scores

    was_training = model.training
    try:
        return float(forward_scores(model, held_out.frame, held_out.pad_id, held_out.batch_size)["loss"].mean())
    finally:
        model.train(was_training)


def evaluations_in(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, held-out loss) of every evaluation in a Trainer log history."""
    return [(int(entry["step"]), float(entry[EVAL_LOSS])) for entry in log_history if EVAL_LOSS in entry]


def best_and_waited(history: list[tuple[int, float]], threshold: float) -> tuple[tuple[int, float] | None, int]:
    """The best evaluation so far, and how many evaluations since it did not improve on it by more than threshold."""
    best, waited = None, 0
    for step, loss in history:
        if best is None or loss < best[1] - threshold:
            best, waited = (step, loss), 0
        else:
            waited += 1
    return best, waited


def evaluation_callback(held_out: HeldOut, training, outcome: EvaluationOutcome, log: Callable[[dict], None],
                        resume_from: Path | None = None):
    """A TrainerCallback evaluating every training.eval_steps; log(values) is the Trainer's own log (history,
    trackers, progress). It must be added before the callback that publishes checkpoints, so a checkpoint holds
    the best weights as of its step."""
    from transformers import TrainerCallback

    every, patience, keep_best = training.eval_steps, training.early_stopping_patience, training.keep_best
    threshold = training.early_stopping_threshold

    class HeldOutEvaluation(TrainerCallback):
        def __init__(self) -> None:
            self.best_weights: dict | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # After a resume the log history is the checkpoint's: its evaluations count towards best and patience.
            outcome.history = evaluations_in(state.log_history)
            if keep_best and resume_from is not None and (Path(resume_from) / BEST_WEIGHTS).is_file():
                from safetensors.torch import load_file

                self.best_weights = load_file(str(Path(resume_from) / BEST_WEIGHTS))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % every and step < state.max_steps:
                return control
            if outcome.history and outcome.history[-1][0] == step:
                return control  # evaluated at this step before a resume
            loss = held_out_loss(model, held_out)
            outcome.history.append((step, loss))
            logging = control.should_log  # the Trainer's log clears it: this step's training loss would go unlogged
            log({EVAL_LOSS: loss})
            control.should_log = logging
            best, waited = best_and_waited(outcome.history, threshold)
            if keep_best and best[0] == step:  # this evaluation is the new best
                self.best_weights = trainable_weights(model)
            if patience and waited >= patience and step < state.max_steps:
                outcome.stopped_early_at = step
                control.should_training_stop = True
                control.should_save = False  # the adapter is saved anyway: nothing resumes from this step
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if keep_best and self.best_weights is not None and folder.is_dir():
                from safetensors.torch import save_file

                save_file(self.best_weights, str(folder / BEST_WEIGHTS))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            best, _ = best_and_waited(outcome.history, threshold)
            outcome.best_step, outcome.best_loss = best if best is not None else (None, None)
            outcome.published_step = state.global_step
            if keep_best and self.best_weights is not None and best is not None and best[0] != state.global_step:
                restore_weights(model, self.best_weights)
                outcome.published_step = best[0]

    return HeldOutEvaluation()


def trainable_weights(model) -> dict:
    """A copy of every trainable parameter (the adapter, and modules trained in full), by name."""
    return {name: parameter.detach().to("cpu", copy=True).contiguous()
            for name, parameter in model.named_parameters() if parameter.requires_grad}


def restore_weights(model, weights: dict) -> None:
    """Put weights copied by trainable_weights back into the model."""
    import torch

    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))
