"""Will the training fit? The memory plan checked against the device before anything is loaded. Dagster-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_pipeline.errors import ModelError
from lora_pipeline.ml.base.memory import (
    GIB,
    Knob,
    MemoryPlan,
    fits,
    knobs,
    plan_for_config,
    resolve_dequant_cache,
    usable_memory_bytes,
)
from lora_pipeline.ml.base.precision import DeviceInfo
from lora_pipeline.ml.training.distributed import plan_launch

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig


@dataclass
class FitAssessment:
    """A training's memory plan against a device: whether it fits and, if not, the settings that would."""

    plan: MemoryPlan
    device: DeviceInfo
    available: int
    fits: bool
    knobs: list[Knob] = field(default_factory=list)

    def where(self) -> str:
        """The memory it was measured against, in words."""
        if self.device.device == "cuda":
            return f"the GPU's {self.available / GIB:.1f} GiB"
        return f"the {self.available / GIB:.1f} GiB of memory available on this {self.device.device}"

    def advice(self, count: int = 4) -> str:
        """The first few knobs, each with the --set overrides that apply it."""
        return "; ".join(f"{knob} (--set {' --set '.join(knob.overrides)})" for knob in self.knobs[:count]) or \
            "no setting of this config brings it under; use a larger device"

    def summary(self) -> dict:
        """The assessment as JSON (`validate --json`'s memory_plan)."""
        return {"device": self.device.device, "parameters": self.plan.parameters,
                "trainable_parameters": self.plan.trainable_parameters, "terms": self.plan.terms(), "total": self.plan.total,
                "available": self.available, "fits": self.fits, "knobs": [str(knob) for knob in self.knobs]}


def assess_fit(model_config: "ModelConfig", device: DeviceInfo, local_folder: Path | None = None,
               vocab_size: int | None = None, shortest: int = 64) -> FitAssessment | None:
    """The training's memory plan on this device, or None when the base model's shapes are not known here
    (a hub model not shipped, offline: nothing can be said before its config.json is downloaded). shortest: the
    least max_length a knob may suggest (the data's length keeping 95% of the examples whole, when known)."""
    plan = plan_for_config(model_config, device, local_folder, vocab_size)
    if plan is None:
        return None
    available = usable_memory_bytes(device)
    if device.device != "cuda":  # the ranks of one machine share its memory; each GPU rank has its own
        available //= plan_launch(model_config.training.distributed, device).nproc_per_node
    plan = resolve_dequant_cache(plan, available)
    fit = fits(plan, available)
    return FitAssessment(plan, device, available, fit, [] if fit else knobs(plan, available, shortest))


def check_fits(model_config: "ModelConfig", device: DeviceInfo, local_folder: Path | None = None,
               shortest: int = 64) -> MemoryPlan | None:
    """The training's memory plan on this device; ModelError with the numbers and the knobs if it will not fit."""
    assessment = assess_fit(model_config, device, local_folder, shortest=shortest)
    if assessment is None:
        return None
    if assessment.fits:
        return assessment.plan
    raise ModelError(
        f"training {model_config.base_model} needs about {assessment.plan.total / GIB:.1f} GiB, more than "
        f"{assessment.where()}, so it was refused before loading anything.\n{assessment.plan.render()}\n"
        f"what would fit: {assessment.advice()}"
    )
