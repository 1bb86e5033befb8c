"""Folding a LoRA adapter into full-precision base weights, and proving the result. Dagster-free.

Never merge into 4-bit weights: the merged weights would be re-quantized, and with bitsandbytes
0.50 on the CPU a 4-bit layer that has run a forward pass has its packed weight re-laid out for the
CPU kernel, after which dequantizing it returns wrong values (relative error about 1.4 instead of
NF4's usual 0.09). So the quantized base is always reloaded from disk and dequantized before any
forward pass, and load_dequantized refuses a model where that already happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.ml.precision import torch_dtype


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


@dataclass(frozen=True)
class MergeFidelity:
    """How closely the merged model reproduces the adapter on the same base weights."""

    max_relative_logit_difference: float
    max_absolute_logit_difference: float
    probe_tokens: int


def merge_adapter(base_model, adapter_dir: Path, probe_batches: list):
    """Apply the adapter to base_model, merge it, and measure merged-vs-adapter logits (fp32).

    Returns the merged plain transformers model and its fidelity on the probe batches.
    """
    from peft import PeftModel

    from lora_pipeline.ml.evaluate import logits_of, max_relative_difference

    with_adapter = PeftModel.from_pretrained(base_model, adapter_dir)
    adapter_logits = logits_of(with_adapter, probe_batches)
    merged = with_adapter.merge_and_unload()
    merged_logits = logits_of(merged, probe_batches)
    absolute = max(float((a - b).abs().max()) for a, b in zip(adapter_logits, merged_logits)) if adapter_logits else 0.0
    fidelity = MergeFidelity(
        max_relative_logit_difference=max_relative_difference(adapter_logits, merged_logits),
        max_absolute_logit_difference=absolute,
        probe_tokens=sum(int(batch.attention_mask.sum()) for batch in probe_batches),
    )
    return merged, fidelity


def save_merged(model, tokenizer_dir: Path, out_dir: Path, dtype: str, trust_remote_code: bool = False) -> None:
    """Save a merged model in dtype as safetensors, with the tokenizer, loadable by plain transformers."""
    from transformers import AutoTokenizer

    model = model.to(torch_dtype(dtype))
    model.config.dtype = dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code).save_pretrained(out_dir)


def merge_to_dir(
    weights_dir: Path,
    dequantize: bool,
    adapter_dir: Path,
    probe_frame,
    out_dir: Path,
    dtype: str,
    trust_remote_code: bool = False,
) -> MergeFidelity:
    """Load the base weights in float32, merge the adapter, check fidelity and save in dtype."""
    from transformers import AutoTokenizer

    from lora_pipeline.ml.evaluate import example_batches, pad_id_of

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    probes = example_batches(probe_frame, pad_id_of(tokenizer), batch_size=4)
    load = load_dequantized if dequantize else load_full_precision
    base = load(weights_dir, trust_remote_code)
    merged, fidelity = merge_adapter(base, adapter_dir, probes)
    save_merged(merged, adapter_dir, out_dir, dtype, trust_remote_code)
    return fidelity
