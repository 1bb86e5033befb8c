"""The memory plan of a preference run: what DPO, KTO and ORPO hold beyond SFT's plan (ml/base/memory.py).

Each step runs every pair's chosen and rejected answers (KTO: each row and a mismatched row for its KL term)
as one padded batch, so the activations and the loss head are those of twice the batch, at full max_length
(TRL pads; no packing, no padding-free rows). With a starting adapter TRL keeps a frozen copy of it as the
reference: one more adapter's weights, without gradients or optimizer states. TRL's trainers run 4-bit layers
as bitsandbytes does, without this project's dequantization cache. The reference's own forward
pass runs without gradients before the policy's, so its peak (its logits) passes before the policy's head
is built and is covered by it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig
    from lora_pipeline.ml.base.memory import MemoryPlan
    from lora_pipeline.ml.base.precision import DeviceInfo


def preference_plan(architecture: dict, config: "ModelConfig", device: "DeviceInfo") -> "MemoryPlan":
    """plan_memory for a preference objective: two sequences per pair, and the reference adapter's copy."""
    from lora_pipeline.ml.base.memory import plan_memory

    training = config.training
    # TRL's trainers run the 4-bit layers as bitsandbytes does: no dequantization cache.
    doubled = training.model_copy(update={"batch_size": 2 * training.batch_size, "packing": False,
                                          "padding_free": False, "dequant_cache": "off"})
    plan = plan_memory(architecture, config.lora, config.quantization, doubled, device)
    reference = plan.adapter if training.init_adapter is not None else 0
    notes = dict(plan.notes)
    notes["activations"] = (f"{training.batch_size} pairs x 2 answers x {training.max_length} tokens, padded, "
                            f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}")
    if reference:
        notes["adapter"] += "; and TRL's frozen copy of the starting adapter, the reference"
    return dataclasses.replace(plan, adapter=plan.adapter + reference, notes=notes)
