"""Token batches as training scores them, shared by training, merging and evaluation. Dagster-free.

Labels use IGNORE_INDEX on every token outside the loss mask (prompt, padding), exactly as the
trainer's collator does, so a loss computed here is the loss training minimised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids with labels on the completion tokens only."""

    input_ids: "object"
    attention_mask: "object"
    labels: "object"


def example_batches(frame: "pd.DataFrame", pad_id: int, batch_size: int) -> list[Batch]:
    """Right-padded batches of formatted examples; tokens outside the loss mask get label -100, as in training."""
    import numpy as np
    import torch

    examples = []
    for ids, mask in zip(frame["input_ids"], frame["loss_mask"]):
        ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(np.asarray(mask) == 1, ids, IGNORE_INDEX)
        # The first position predicts nothing, so an example needs a trained token after it.
        if (labels[1:] != IGNORE_INDEX).any():
            examples.append((ids, labels))
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.from_numpy(ids)
            labels[row, : len(labs)] = torch.from_numpy(labs)
            mask[row, : len(ids)] = 1
        batches.append(Batch(input_ids=input_ids, attention_mask=mask, labels=labels))
    return batches


def pad_id_of(tokenizer) -> int:
    """The id batches are padded with (any id works: padded positions are masked and unlabelled)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def logits_of(model, batches: list[Batch]) -> list:
    """fp32 logits of each batch (for comparing two models on identical inputs)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    outputs = []
    with torch.no_grad():
        for batch in batches:
            logits = model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
            ).logits
            outputs.append(logits.float().cpu() * batch.attention_mask.unsqueeze(-1))
    return outputs


def max_relative_difference(reference: list, candidate: list) -> float:
    """max |a - b| / max |a| over all logits."""
    worst = 0.0
    scale = 0.0
    for a, b in zip(reference, candidate):
        worst = max(worst, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
    return worst / scale if scale else worst
