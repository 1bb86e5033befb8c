"""Will the training fit? The memory plan checked against the device before anything is loaded. Dagster-free."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lora_pipeline.errors import ModelError
from lora_pipeline.ml.memory import GIB, MemoryPlan, fits, knobs, plan_for_config, usable_memory_bytes
from lora_pipeline.ml.precision import DeviceInfo

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig


def check_fits(model_config: "ModelConfig", device: DeviceInfo, local_folder: Path | None = None) -> MemoryPlan | None:
    """The training's memory plan on this device; ModelError with the numbers and the knobs if it will not fit.

    None when the base model's shapes are not known here (a hub model not shipped, offline): then
    nothing can be said before its config.json is downloaded.
    """
    plan = plan_for_config(model_config, device, local_folder)
    if plan is None:
        return None
    available = usable_memory_bytes(device)
    if fits(plan, available):
        return plan
    where = f"the GPU's {available / GIB:.1f} GiB" if device.device == "cuda" else \
        f"the {available / GIB:.1f} GiB of memory available on this {device.device}"
    options = knobs(plan, available)
    advice = "; ".join(f"{knob} (--set {' --set '.join(knob.overrides)})" for knob in options[:4]) or \
        "no setting of this config brings it under; use a larger device"
    raise ModelError(
        f"training {model_config.base_model} needs about {plan.total / GIB:.1f} GiB, more than {where}, so it "
        f"was refused before loading anything.\n{plan.render()}\nwhat would fit: {advice}"
    )
