"""The training step: only what the loss needs, token accuracy on logging steps, a finite-loss guard.

TRL's SFTTrainer computes its loss through a fused LM head that, on every micro-batch, also scores
per-token entropy and top-1 accuracy; without Triton (on a CPU) that head makes about twenty passes
over the logits. The lean loss here projects only the positions that have a label through the
model's own LM head and takes one cross-entropy: the same loss (the sum of the token losses over
the number of labelled tokens in the optimizer step, as TRL and transformers count it), at a third
of the head's cost. Accuracy and entropy are computed, without gradients, only on steps that log.
On CUDA TRL's Triton head stays, since it never builds the full logits.

The cross-entropy's backward (summed_cross_entropy) is softmax minus one-hot from the logits, in
torch's vectorised softmax; torch's own zero-fills a gradient the size of the logits and runs its
log-softmax backward, which on a CPU is ~9x slower than the softmax (9% of a step on the parity
job before this).
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

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    learned = targets != IGNORE_INDEX
    # Positions that predict a label in any row; with packed or padding-free batches there is one row.
    positions = learned.any(dim=0).nonzero().squeeze(-1)
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
    targets = targets[:, positions]
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    summed = summed_cross_entropy(flat_logits, targets.reshape(-1))
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


def summed_cross_entropy(logits, targets):
    """F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"), with a leaner backward."""
    return _summed_cross_entropy_function().apply(logits, targets)


_SUMMED_CROSS_ENTROPY = None


def _summed_cross_entropy_function():
    global _SUMMED_CROSS_ENTROPY
    if _SUMMED_CROSS_ENTROPY is not None:
        return _SUMMED_CROSS_ENTROPY
    import torch

    class SummedCrossEntropy(torch.autograd.Function):
        """Sum over labelled rows of logsumexp(logits) - logits[target]; the gradient is softmax - one-hot."""

        @staticmethod
        def forward(ctx, logits, targets):
            learned = targets != IGNORE_INDEX
            picked_targets = targets.clamp(min=0).unsqueeze(1)
            token_losses = -torch.log_softmax(logits, dim=-1).gather(1, picked_targets).squeeze(1)
            ctx.save_for_backward(logits, picked_targets, learned)
            return torch.where(learned, token_losses, 0.0).sum()

        @staticmethod
        def backward(ctx, grad_output):
            logits, picked_targets, learned = ctx.saved_tensors
            grad = torch.softmax(logits, dim=-1).mul_(grad_output)
            grad.scatter_add_(1, picked_targets, (-grad_output).expand(picked_targets.shape).to(grad.dtype))
            if not bool(learned.all()):
                grad.mul_(learned.unsqueeze(1))
            return grad, None

    _SUMMED_CROSS_ENTROPY = SummedCrossEntropy
    return SummedCrossEntropy


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
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens and DDP averages the gradients over ranks: scaled
                # as the Trainer scales its own loss, so N ranks step as one process with their whole batch would.
                loss = loss * self.accelerator.num_processes
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
