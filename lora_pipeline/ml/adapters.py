"""Several LoRA adapters on one loaded base, switched at run time. Dagster-free.

PEFT's own workflow: the base is loaded once, the first adapter with PeftModel.from_pretrained, the
others with load_adapter; set_adapter picks the one that answers and disable_adapter lets the bare
base answer. Every model compared this way sees the same base weights in memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def attach_adapters(base_model, adapters: dict[str, "str | Path"]):
    """The base with every adapter attached under its name; returns the PeftModel."""
    from peft import PeftModel

    if not adapters:
        raise ValueError("no adapter to attach")
    names = list(adapters)
    if any(not name for name in names):
        raise ValueError("an adapter name is empty")
    first, *rest = names
    model = PeftModel.from_pretrained(base_model, str(adapters[first]), adapter_name=first)
    for name in rest:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model


@contextlib.contextmanager
def using(model, name: "str | None"):
    """Within the block the model answers as adapter `name`, or as the bare base when name is None."""
    if name is None:
        with model.disable_adapter():
            yield model
    else:
        model.set_adapter(name)
        yield model
