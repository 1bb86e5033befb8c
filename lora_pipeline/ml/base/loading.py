"""Loading a saved base for merging and evaluation: in float32, dequantized when it was quantized. Dagster-free.

Never dequantize a 4-bit layer that has run: with bitsandbytes 0.50 on the CPU a 4-bit layer that
has run a forward pass has its packed weight re-laid out for the CPU kernel, after which
dequantizing it returns wrong values (relative error about 1.4 instead of NF4's usual 0.09). So
the quantized base is always reloaded from disk and dequantized before any forward pass, and
load_dequantized refuses a model where that already happened.
"""

from __future__ import annotations

from pathlib import Path


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_safetensors_adapter(adapter_dir: Path, allow_pickle: bool = False) -> None:
    """Refuse an adapter folder whose weights are only a pickle (adapter_model.bin: unpickling can run code).

    With allow_pickle (the opt-in bases have), PEFT loads the pickle with torch's weights_only loader."""
    from lora_pipeline.errors import ModelError

    folder = Path(adapter_dir)
    if (folder / ADAPTER_WEIGHTS).is_file() or allow_pickle:
        return
    pickles = sorted(path.name for path in folder.glob("adapter_model.*") if path.suffix in (".bin", ".pt", ".pth"))
    raise ModelError(f"{folder}: the adapter's weights are {'a pickle (' + ', '.join(pickles) + ')' if pickles else 'missing'}"
                     f"; only {ADAPTER_WEIGHTS} is loaded (unpickling can run code): convert it, or set allow_pickle: "
                     "true if you trust it")


class StaleQuantStateError(RuntimeError):
    """A 4-bit layer has run on the CPU, so dequantizing it would return wrong weights."""


def is_quantized_dir(model_dir: Path) -> bool:
    """Whether a saved model folder holds bitsandbytes-quantized weights."""
    import json

    return "quantization_config" in json.loads((model_dir / "config.json").read_text())


def assert_dequantizable(model) -> None:
    """Refuse to dequantize 4-bit layers whose packing was changed by a CPU forward pass."""
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise StaleQuantStateError(
                f"{name}: this 4-bit layer has already run on the CPU and its packed weight was "
                "re-laid out for the CPU kernel, so dequantizing it would return wrong weights; "
                "reload the quantized model from disk and dequantize it before any forward pass"
            )


def load_dequantized(quantized_dir: Path, trust_remote_code: bool = False):
    """Reload a saved quantized model and dequantize it to float32 before it runs anything."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        quantized_dir, device_map={"": "cpu"}, trust_remote_code=trust_remote_code
    )
    assert_dequantizable(model)
    model = model.dequantize(dtype=torch.float32)
    return model.to(torch.float32)


def load_full_precision(model_dir: Path, trust_remote_code: bool = False):
    """Load an unquantized model folder in float32 (merging happens in float32, then is cast)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map={"": "cpu"}, trust_remote_code=trust_remote_code
    )
