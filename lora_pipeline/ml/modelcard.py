"""Hugging Face model cards (README.md) that carry how an artifact was made. Dagster-free."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig
    from lora_pipeline.ml.train import TrainResult


def lineage_section(lineage: dict) -> list[str]:
    """What made the artifact, for its model card: the lineage travels with the files."""
    parents = ", ".join(f"{name} {parent.get('version')}" for name, parent in lineage.get("parents", {}).items())
    hardware = lineage.get("hardware", {})
    return [
        "## Lineage",
        "",
        f"- version: {lineage.get('version')} (inputs: {parents or 'none'})",
        f"- base model: {lineage.get('base_model')} at revision {lineage.get('base_revision') or 'default'}",
        f"- dataset fingerprint: {lineage.get('dataset_fingerprint', 'unknown')}, source version "
        f"{lineage.get('source_version') or 'n/a'}",
        f"- config hash: {lineage.get('config_hash')}, seed {lineage.get('seed')}",
        f"- code: lora-pipeline {lineage.get('git_commit')}",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in lineage.get('libraries', {}).items())}",
        f"- hardware: {hardware.get('device', 'cpu')} ({hardware.get('gpu_count', 0)} GPU), "
        f"{hardware.get('cpus')} CPUs, {hardware.get('machine')}",
        f"- made {lineage.get('started_at')} in {lineage.get('wall_seconds')} s by Dagster run "
        f"{lineage.get('dagster_run_id')}",
        "",
    ]


def merged_card(model_config: "ModelConfig", lineage: dict, merged_into: str, dtype: str, fidelity) -> str:
    """Model card of a merged model: what was merged into what, how faithfully, and its lineage."""
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            f"base_model: {model_config.base_model}",
            "tags: [lora, merged, lora-pipeline]",
            "---",
            "",
            f"# {model_config.base_model} with its LoRA adapter merged in",
            "",
            f"The adapter was merged into the {merged_into} base weights and saved in {dtype}; it loads with "
            "`AutoModelForCausalLM.from_pretrained(this_folder)`, no PEFT needed.",
            "",
            f"- merged vs adapter logits: max relative difference {fidelity.max_relative_logit_difference:.2e} "
            f"on {fidelity.probe_tokens} held-out tokens",
            "",
            *lineage_section(lineage),
        ]
    )


def adapter_card(model_config: "ModelConfig", result: "TrainResult", base_name: str, lineage: dict) -> str:
    """Model card of a trained adapter: base, method, figures, lineage and the full config."""
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
            *lineage_section(lineage),
            "## Config",
            "",
            "```json",
            json.dumps(model_config.model_dump(mode="json"), indent=2, sort_keys=True),
            "```",
            "",
        ]
    )
