"""Which modules LoRA adapts, per architecture. Dagster-free."""

from __future__ import annotations

import json
from pathlib import Path

LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# All linear projections of each architecture family, keyed by config.json's model_type.
LINEAR_PROJECTIONS: dict[str, list[str]] = {
    **{
        model_type: LLAMA_STYLE
        for model_type in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text",
        )
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def model_type_of(model_dir: Path) -> str:
    """model_type from a model folder's config.json."""
    return json.loads((model_dir / "config.json").read_text())["model_type"]


def resolve_target_modules(requested: list[str], model_type: str) -> list[str] | str:
    """Explicit names pass through; 'auto' becomes the architecture's linear projections.

    Architectures not in the table fall back to PEFT's own 'all-linear' selection.
    """
    if requested != ["auto"]:
        return list(requested)
    return list(LINEAR_PROJECTIONS.get(model_type, [])) or "all-linear"
