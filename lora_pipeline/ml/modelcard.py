"""Hugging Face model cards (README.md) that carry how an artifact was made. Dagster-free."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig
    from lora_pipeline.ml.train import TrainResult


def adapter_card(model_config: "ModelConfig", result: "TrainResult", base_name: str) -> str:
    """Model card of a trained adapter: base, method, figures and the full config."""
    method = "QLoRA" if model_config.quantization.mode != "none" else "LoRA"
    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {base_name}",
            "tags: [lora, lora-pipeline]",
            "---",
            "",
            f"# {method} adapter for {model_config.base_model}",
            "",
            "Trained by lora-pipeline with TRL's SFTTrainer and PEFT.",
            "",
            f"- quantization during training: {model_config.quantization.mode}",
            f"- rank {model_config.lora.r}, alpha {model_config.lora.alpha}, target modules: {result.target_modules}",
            f"- optimizer steps: {result.steps}, train loss: {result.train_loss:.4f}",
            f"- throughput: {result.tokens_per_second:.0f} tokens/s, {result.train_tokens} tokens",
            f"- config hash: {model_config.canonical_hash()}",
            "",
            "Load it with `PeftModel.from_pretrained(base_model, this_folder)`.",
            "",
            "## Config",
            "",
            "```json",
            json.dumps(model_config.model_dump(mode="json"), indent=2, sort_keys=True),
            "```",
            "",
        ]
    )
