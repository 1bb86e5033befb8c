"""Hugging Face model cards (README.md) that carry how an artifact was made and how it scored. Dagster-free.

The YAML front matter is huggingface_hub's ModelCardData, so the Hub reads the base model, the
library and (once evaluated) the model-index results from it.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig
    from lora_pipeline.ml.training import TrainResult


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


def _card(card_data: ModelCardData, body: list[str]) -> str:
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)


def merged_card(model_config: "ModelConfig", lineage: dict, merged_into: str, dtype: str, fidelity) -> str:
    """Model card of a merged model: what was merged into what, how faithfully, and its lineage."""
    return _card(
        ModelCardData(library_name="transformers", base_model=model_config.base_model,
                      tags=["lora", "merged", "lora-pipeline"]),
        [
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
    return _card(
        ModelCardData(library_name="peft", base_model=base_name, tags=["lora", "lora-pipeline"]),
        [
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


EVALUATION_HEADING = "## Evaluation"
_MODEL_LABELS = {"base": "base", "adapter": "adapter", "merged": "merged", "merged_into_original": "merged into the original weights"}


def model_index(document: dict, role: str, model_name: str, dataset: str) -> list[dict]:
    """Hugging Face model-index entries of one evaluated model (the Hub's results format): the held-out figures,
    and each per-example metric's mean with its 95% interval bounds."""
    from huggingface_hub.repocard_data import eval_results_to_model_index

    return eval_results_to_model_index(model_name, _eval_results(document, role, dataset))


def _eval_results(document: dict, role: str, dataset: str) -> list:
    scores = document[role]
    results = [
        EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset, dataset_split="held-out",
                   metric_type=metric, metric_name=name, metric_value=round(float(scores[key]), 4))
        for metric, name, key in (("loss", "held-out loss (per-example mean over response tokens)", "loss"),
                                  ("perplexity", "perplexity", "perplexity"),
                                  ("accuracy", "token accuracy", "token_accuracy"))
    ]
    for metric, interval in document["comparison"].get("intervals", {}).get(role, {}).items():
        if metric in ("loss", "token_accuracy"):
            continue
        low, high = interval["ci95"]
        results.append(EvalResult(
            task_type="text-generation", dataset_type=dataset, dataset_name=dataset, dataset_split="held-out",
            metric_type=metric, metric_name=f"{metric} (mean per example, 95% CI {low:.4f} to {high:.4f})",
            metric_value=round(float(interval["value"]), 4)))
    return results


def with_evaluation(card_text: str, document: dict, role: str, model_name: str, dataset: str, made_by: str) -> str:
    """The card with the evaluation's figures: a section before the lineage and model-index results in the front matter.

    role is the model the card describes ('adapter' or 'merged'); document is the eval report's
    metrics.json; made_by names the report (version and where it lives). A card evaluated
    before has its figures replaced.
    """
    card = ModelCard(card_text)
    card.data.model_name = model_name
    card.data.eval_results = _eval_results(document, role, dataset)
    comparison = document["comparison"]
    rows = [
        f"| {_MODEL_LABELS.get(name, name)}{' (this model)' if name == role else ''} | {values['loss']:.4f} | "
        f"{values['perplexity']:.2f} | {values['token_accuracy']:.3f} |"
        for name, values in document.items()
        if name != "comparison"
    ]
    section = [
        EVALUATION_HEADING,
        "",
        f"On {comparison['examples']} held-out examples of {dataset} (loss on response tokens only), by {made_by}:",
        "",
        "| model | loss (per-example mean) | perplexity | token accuracy |",
        "|---|---|---|---|",
        *rows,
        "",
        f"- adapter vs base: loss {comparison['adapter_vs_base_loss_change']:+.1%}",
        f"- merged ({comparison['merge_weights']} weights) vs adapter: loss {comparison['merged_vs_adapter_loss_change']:+.2%}",
        "",
        "",
    ]
    body = re.sub(rf"{EVALUATION_HEADING}\n.*?(?=^## |\Z)", "", card.text, flags=re.S | re.M)
    anchor = body.find("## Lineage")
    body = body[:anchor] + "\n".join(section) + body[anchor:] if anchor >= 0 else body.rstrip() + "\n\n" + "\n".join(section)
    return f"---\n{card.data.to_yaml()}\n---\n{body}"


# A Hub model id: an optional namespace and a name (what the Hub's base_model metadata accepts).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def is_hub_id(name: str) -> bool:
    """Whether a base_model names a Hub model (not a built-in, a local folder or a URL)."""
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith(("builtin:", ".")) and "://" not in name


def hub_card(card_text: str, base_model: str, repo_id: str, revision: str, merged_folder: str | None) -> str:
    """The champion's card as published to a Hub repo: how to load it from there, and front matter the Hub accepts.

    The Hub refuses a card whose base_model is not a model on the Hub, so a built-in or local base
    is named in the text only. merged_folder: the repo folder holding the merged model, if uploaded.
    """
    card = ModelCard(card_text)
    on_hub = is_hub_id(base_model)
    card.data.base_model = base_model if on_hub else None
    at = "" if revision == "main" else f", revision={revision!r}"
    if on_hub:
        usage = ["## Loading it from the Hub", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
                 f"model = AutoPeftModelForCausalLM.from_pretrained({repo_id!r}{at})", "```", ""]
    else:
        usage = ["## Loading it from the Hub", "",
                 f"The base model ({base_model}) is not on the Hub: load a copy of it and attach this adapter "
                 f"with `PeftModel.from_pretrained(base, {repo_id!r}{at})`.", ""]
    if merged_folder is not None:
        usage += [f"The merged model (no PEFT needed) is in `{merged_folder}/`:", "", "```python",
                  "from transformers import AutoModelForCausalLM", "",
                  f"model = AutoModelForCausalLM.from_pretrained({repo_id!r}, subfolder={merged_folder!r}{at})",
                  "```", ""]
    body, section = card.text, "\n".join(usage)
    anchor = body.find("## Lineage")
    body = body[:anchor] + section + "\n" + body[anchor:] if anchor >= 0 else body.rstrip() + "\n\n" + section
    return f"---\n{card.data.to_yaml()}\n---\n{body}"
