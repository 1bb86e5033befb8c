"""The training step: only what the loss needs, token accuracy on logging steps, a finite-loss guard.

TRL's SFTTrainer computes its loss through a fused LM head that, on every micro-batch, also scores
per-token entropy and top-1 accuracy; without Triton (on a CPU) that head makes about twenty passes
over the logits. The lean loss here projects only the positions that have a label through the
model's own LM head and takes one cross-entropy: the same loss (the sum of the token losses over
the number of labelled tokens in the optimizer step, as TRL and transformers count it), at a third
of the head's cost. Accuracy and entropy are computed, without gradients, only on steps that log.
On CUDA TRL's Triton head stays, since it never builds the full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_pipeline.errors import LoraPipelineError
from lora_pipeline.ml.batches import IGNORE_INDEX


class TrainingDivergedError(LoraPipelineError):
    """The loss became NaN or infinite: training stopped instead of saving a broken adapter."""


@dataclass
class BatchTally:
    """Tokens the trainer has seen: real ones, and the padding batches carried beside them."""

    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def pad_fraction(self) -> float:
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0


def lean_loss(model, inputs: dict, num_items_in_batch=None, with_metrics: bool = False):
    """(loss, metrics) of a causal-LM batch, projecting only the labelled positions through the LM head.

    labels are unshifted (position t is predicted from t-1), IGNORE_INDEX where nothing is learned. metrics
    is {} unless with_metrics: then the batch's labelled-token count, correct top-1 count and entropy sum.
    """
    import torch
    import torch.nn.functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    learned = targets != IGNORE_INDEX
    # Positions that predict a label in any row; with packed or padding-free batches there is one row.
    positions = learned.any(dim=0).nonzero().squeeze(-1)
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
    targets = targets[:, positions]
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    summed = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    count = learned.sum() if num_items_in_batch is None else num_items_in_batch
    loss = summed / torch.as_tensor(count, device=summed.device).clamp(min=1)
    metrics = {}
    if with_metrics:
        with torch.no_grad():
            mask = targets.reshape(-1) != IGNORE_INDEX
            kept = flat_logits.detach()[mask]
            log_probs = kept.log_softmax(-1)
            metrics = {
                "tokens": int(mask.sum()),
                "correct": int((kept.argmax(-1) == targets.reshape(-1)[mask]).sum()),
                "entropy": float(-(log_probs.exp() * log_probs).sum()),
            }
    return loss, metrics


def step_trainer_class(trainer_class, lean: bool):
    """trainer_class with the lean loss (when lean), pad accounting and a finite-loss check on every micro-batch."""

    class StepTrainer(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tally = BatchTally()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self._count_tokens(inputs)
            if not lean or return_outputs or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            logging_step = (self.state.global_step + 1) % self.args.logging_steps == 0
            loss, metrics = lean_loss(model, inputs, num_items_in_batch, with_metrics=logging_step)
            if metrics:
                recorded = self._metrics["train"]
                recorded["mean_token_accuracy"].append(metrics["correct"] / max(metrics["tokens"], 1))
                recorded["entropy"].append(metrics["entropy"] / max(metrics["tokens"], 1))
            self._metrics["train"]["num_tokens"] = [self.tally.real_tokens]
            return loss

        def _count_tokens(self, inputs) -> None:
            if "attention_mask" in inputs:
                real, carried = int(inputs["attention_mask"].sum()), int(inputs["attention_mask"].numel())
            else:  # padding-free: one row, padded at most to a multiple at its end
                carried = int(inputs["input_ids"].shape[-1])
                boundaries = inputs.get("cu_seq_lens_q")
                real = int(boundaries[-1]) if boundaries is not None else carried
            self.tally.real_tokens += real
            self.tally.padded_tokens += carried - real

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            value = float(loss.detach().float().mean())
            if value != value or value in (float("inf"), float("-inf")):
                raise TrainingDivergedError(
                    f"the training loss is {value} at step {self.state.global_step + 1}: training stopped and no "
                    "adapter was saved; lower training.learning_rate or training.max_grad_norm, or check the data"
                )
            return loss

    return StepTrainer
