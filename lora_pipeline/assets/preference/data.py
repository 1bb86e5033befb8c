"""formatted_dataset for preference rows (training.objective dpo, kto, orpo): the pairs rendered with the model's
template, tokenized with the prompt apart from the answers, split by prompt; and the objective checked
against the rows before anything is loaded."""

from __future__ import annotations

import time

import dagster as dg

from lora_pipeline.assets.common import publish_stage, stage_lineage, stage_output, write_json
from lora_pipeline.assets.starting import StartingAdapter
from lora_pipeline.config.schema import ModelConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.ml.data.templates import resolve_template
from lora_pipeline.ml.preference.formats import PREFERENCE_FORMATS
from lora_pipeline.ml.preference.formatted import format_preferences
from lora_pipeline.ml.report.plots import length_histogram_png, markdown_image
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

# The formats each objective trains on: KTO unpairs pairs itself.
OBJECTIVE_FORMATS = {"dpo": ("preference",), "orpo": ("preference",), "kto": ("preference", "kto")}


def require_objective_fits(model_config: ModelConfig, fmt: str, source: str) -> None:
    """Refuse rows the objective cannot train on, naming the source, the format and the keys to change."""
    objective = model_config.training.objective
    if objective == "sft" and fmt in PREFERENCE_FORMATS:
        raise ConfigError(f"{source}: the rows are {fmt} rows (chosen/rejected, or prompt/completion/label), which "
                          "supervised fine-tuning cannot learn from; set training.objective to dpo, kto or orpo")
    if objective != "sft" and fmt not in OBJECTIVE_FORMATS[objective]:
        wanted = " or ".join(OBJECTIVE_FORMATS[objective])
        raise ConfigError(f"{source}: training.objective {objective} trains on {wanted} rows (prompt, chosen, "
                          f"rejected{'; or prompt, completion, label' if objective == 'kto' else ''}), but these "
                          f"are {fmt} rows; give preference data, or set training.objective: sft")


def preference_tokenizer(model_config: ModelConfig, hub: ModelHub, start: StartingAdapter | None,
                         storage: ArtifactStore):
    """The tokenizer pairs are rendered with: the starting adapter's (it holds the template the adapter was trained
    with, so the pairs are put as it learned to read them), else the base's."""
    if start is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(storage.local_path(start.adapter),
                                             trust_remote_code=model_config.trust_remote_code)
    return hub.tokenizer(model_config.base_model, model_config.base_revision, lambda: [],
                         trust_remote_code=model_config.trust_remote_code)


def formatted_preferences(context: dg.AssetExecutionContext, model_config: ModelConfig, storage: ArtifactStore,
                          hub: ModelHub, raw_dataset: ArtifactRef, loaded, start: StartingAdapter | None,
                          summary_file: str) -> dg.Output[ArtifactRef]:
    """The preference branch of formatted_dataset: render, tokenize, split, publish, with the figures the UI shows."""
    started = time.perf_counter()
    dataset = model_config.dataset
    tokenizer = preference_tokenizer(model_config, hub, start, storage)
    template = resolve_template(dataset.template, "messages", tokenizer.chat_template)
    max_length = model_config.training.max_length
    formatted = format_preferences(loaded.frame, loaded.format, loaded.rows.where, tokenizer, template,
                                   dataset.eval_fraction, max_length, dataset.system_prompt)
    counts, advice = formatted.counts, formatted.advice
    with storage.staging_dir() as staging:
        formatted.train.to_parquet(staging / "train.parquet", index=False)
        formatted.evaluation.to_parquet(staging / "eval.parquet", index=False)
        write_json(staging / summary_file, {
            "format": loaded.format, "template": template.name, "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id, "pad_token": tokenizer.pad_token, "counts": counts,
            "max_length": max_length, "max_truncation_rate": dataset.max_truncation_rate,
            "length_advice": vars(advice),
            **({"init_adapter": start.as_entry()} if start is not None else {}),
        })
        record = stage_lineage(context, model_config, storage, {"raw_dataset": raw_dataset},
                               train_rows=counts["train_rows"], eval_rows=counts["eval_rows"],
                               **({"init_adapter": start.as_entry()} if start is not None else {}))
        ref = publish_stage(context, storage, staging, record)
    kind = "pairs" if loaded.format == "preference" else "examples"
    context.log.info(f"{counts['rows_in']} {loaded.format} rows -> {counts['train_rows']} train + "
                     f"{counts['eval_rows']} held-out {kind} (split by prompt); {counts['duplicates']} duplicates "
                     f"dropped; {counts['over_max_length']} over max_length {max_length}, rendered with the "
                     f"{template.name} template in {time.perf_counter() - started:.2f}s")
    preview = formatted.train.head(3)[["prompt", *[c for c in ("chosen", "rejected", "completion", "label")
                                                   if c in formatted.train.columns]]]
    return stage_output(ref, record, model_config, {
        "format": loaded.format,
        "template": template.name,
        "eos_token": tokenizer.eos_token,
        **({"init_adapter": start.describe()} if start is not None else {}),
        **{name: value for name, value in counts.items() if name != "max_length"},
        "max_length_keeping_95%": advice.keeps_95,
        "max_length_keeping_99%": advice.keeps_99,
        "truncation_rate": float(advice.longer / max(advice.examples, 1)),
        "token_lengths": dg.MetadataValue.md(markdown_image(
            length_histogram_png(formatted.lengths, max_length), "prompt and longest answer, in tokens")),
        "preview": dg.MetadataValue.md(preview.map(lambda v: str(v)[:80].replace("\n", " ")).to_markdown(index=False)),
    })
