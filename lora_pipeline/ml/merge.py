"""Folding a LoRA adapter into full-precision base weights, and proving the result. Dagster-free.

Never merge into 4-bit weights: the merged weights would be re-quantized, and with bitsandbytes
0.50 on the CPU a 4-bit layer that has run a forward pass has its packed weight re-laid out for the
CPU kernel, after which dequantizing it returns wrong values (relative error about 1.4 instead of
NF4's usual 0.09); see loading.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.ml.batches import example_batches, logits_of, max_relative_difference, pad_id_of
from lora_pipeline.ml.base.loading import load_dequantized, load_full_precision, require_safetensors_adapter
from lora_pipeline.ml.base.precision import torch_dtype
from lora_pipeline.ml.prompt_format import stop_token_ids


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

    require_safetensors_adapter(adapter_dir)
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
    """Save a merged model in dtype as safetensors, with the tokenizer (and its training template), loadable by
    plain transformers; the generation config stops at the tokenizer's EOS too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    model = model.to(torch_dtype(dtype))
    model.config.dtype = dtype
    # Generation stops at the token training put after every answer, whatever the base's config said.
    if model.generation_config is not None:
        model.generation_config.eos_token_id = stop_token_ids(model.generation_config.eos_token_id, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


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

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    probes = example_batches(probe_frame, pad_id_of(tokenizer), batch_size=4)
    load = load_dequantized if dequantize else load_full_precision
    base = load(weights_dir, trust_remote_code)
    merged, fidelity = merge_adapter(base, adapter_dir, probes)
    save_merged(merged, adapter_dir, out_dir, dtype, trust_remote_code)
    return fidelity
