"""The `preference:` section: what preference tuning (training.objective dpo, kto or orpo) needs beyond SFT.

Everything else a preference run uses is the SFT config: the LoRA, quantization and training sections
(learning rate, batch, steps, max_length), evaluation and promotion. TRL's trainers do the work:
DPOTrainer and KTOTrainer from `trl`, ORPOTrainer from `trl.experimental.orpo` (experimental in the
pinned TRL 1.16, so its arguments may move with a TRL upgrade).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lora_pipeline.config.base import StrictSection

OBJECTIVES = ("sft", "dpo", "kto", "orpo")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]
# DPO's loss types in TRL 1.16 that need nothing beyond beta and label smoothing.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "exo_pair", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


class PreferenceSettings(StrictSection):
    """Preference tuning (training.objective dpo, kto or orpo): the strength of the preference, the loss and the reference."""

    beta: float = Field(
        default=0.1,
        gt=0.0,
        description="How strongly the tuned model may move away from its reference to prefer the chosen answers "
        "(DPO and KTO's beta; ORPO's lambda, the weight of its odds-ratio term). Higher keeps closer to the "
        "reference. Also the scale of the implicit reward eval_report ranks pairs with.",
    )
    loss_type: Literal[DPO_LOSS_TYPES] = Field(  # type: ignore[valid-type]
        default="sigmoid",
        description="DPO's loss (TRL's loss_type): 'sigmoid' is the DPO paper's; 'ipo', 'hinge', 'robust' "
        "(with label_smoothing as the assumed share of flipped labels) and TRL's others. Ignored by KTO and ORPO.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0.0,
        lt=0.5,
        description="DPO: the share of pairs assumed to be labelled the wrong way round (conservative DPO, "
        "and the 'robust' loss). 0: every label is trusted.",
    )
    reference: Literal["auto", "init_adapter", "base"] = Field(
        default="auto",
        description="The reference the tuned model is kept close to and compared with. 'init_adapter': the "
        "starting adapter (training.init_adapter), kept frozen by TRL as its 'ref' adapter; 'base': the base "
        "with adapters disabled; 'auto': the starting adapter when there is one, else the base. The run "
        "fails before the first step when the reference is not what this says. ORPO has no reference model; "
        "its evaluation still compares with the starting point.",
    )
    desirable_weight: float = Field(
        default=1.0, gt=0.0, description="KTO: the weight of the desirable (chosen) examples' loss."
    )
    undesirable_weight: float = Field(
        default=1.0, gt=0.0, description="KTO: the weight of the undesirable (rejected) examples' loss."
    )
