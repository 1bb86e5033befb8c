"""trained_adapter for a preference model (training.objective dpo, kto, orpo): TRL's preference trainers on the
formatted pairs, from the starting champion (training.init_adapter) or a new LoRA.

Shared with SFT: the quantized base (QLoRA), the reuse of an adapter made from the same inputs (the starting
adapter's content is one of them), checkpoints in the store every training.checkpoint_every steps and the
resume from the newest one made from the same inputs, the MLflow run (curves live, then the adapter), the
template recorded in the adapter, the summary the leaderboard reads. Not shared: several processes (a
preference run trains in the Dagster step; training.distributed is refused for it).
"""

from __future__ import annotations

import dataclasses

import dagster as dg
import pandas as pd

from lora_pipeline.assets.common import publish_stage, read_json, run_order, stage_lineage, stage_output, write_json
from lora_pipeline.assets.data import FORMAT_SUMMARY
from lora_pipeline.assets.preference.data import require_objective_fits
from lora_pipeline.assets.starting import StartingAdapter, starting_adapter
from lora_pipeline.config.schema import ModelConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.ml.prompt_format import record_prompt_format
from lora_pipeline.ml.report.plots import curves_png, markdown_image
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore
from lora_pipeline.resources.tracking import ExperimentTracker

STAGE = "trained_adapter"
TRAINING_SUMMARY = "training_summary.json"
LOSS_CURVE = "loss_curve.png"


def preference_settings(model_config: ModelConfig):
    """The ML side's settings from the config's training and preference sections."""
    from lora_pipeline.ml.preference.training import PreferenceSettings

    training, preference = model_config.training, model_config.preference
    values = {
        "objective": training.objective, "beta": preference.beta, "loss_type": preference.loss_type,
        "label_smoothing": preference.label_smoothing, "learning_rate": training.learning_rate,
        "batch_size": training.batch_size, "max_steps": training.max_steps or -1, "epochs": training.epochs,
        "max_length": training.max_length, "logging_steps": training.logging_steps, "seed": training.seed,
        "desirable_weight": preference.desirable_weight, "undesirable_weight": preference.undesirable_weight,
        "grad_accumulation": training.grad_accumulation, "warmup": training.warmup,
        "lr_scheduler": training.lr_scheduler, "max_grad_norm": training.max_grad_norm,
        "checkpoint_every": training.checkpoint_every or 0,
    }
    known = {field.name for field in dataclasses.fields(PreferenceSettings)}
    return PreferenceSettings(**{name: value for name, value in values.items() if name in known})


def require_reference(model_config: ModelConfig, start: StartingAdapter | None, storage: ArtifactStore,
                      quantized_base: ArtifactRef) -> str:
    """The reference as the config asks for it, checked before anything loads: the starting adapter on the very base
    it was trained on, or the base."""
    asked = model_config.preference.reference
    if start is None:
        if asked == "init_adapter":
            raise ConfigError("preference.reference is 'init_adapter' but training.init_adapter is not set")
        return "base"
    if asked == "base":
        raise ConfigError("preference.reference 'base' with training.init_adapter: TRL keeps the starting adapter "
                          "as the reference when it trains one; drop training.init_adapter to compare with the base")
    if storage.content_digest(start.quantized_base) != storage.content_digest(quantized_base):
        raise ConfigError(f"the reference is not what the config says: the {start.describe()} was trained on "
                          f"{start.quantized_base.uri}, whose content differs from this model's quantized_base "
                          f"({quantized_base.uri}); re-run quantized_base so it copies that base")
    return start.describe()


def train_preference_adapter(context: dg.AssetExecutionContext, model_config: ModelConfig, storage: ArtifactStore,
                             formatted_dataset: ArtifactRef, quantized_base: ArtifactRef, inputs: dict,
                             key: str, tracker: ExperimentTracker, owner: str) -> dg.Output[ArtifactRef]:
    """Train (or reuse, or resume) the preference adapter and publish it with its curves and summary."""
    from lora_pipeline.assets.training import inputs_key, publish_checkpoint, resume_point
    from lora_pipeline.ml.preference.training import train_preference

    partition = context.partition_key
    # The formatted pairs are shared by the objectives, so the objective is checked against them here too.
    formatted_format = read_json(storage.local_path(formatted_dataset) / FORMAT_SUMMARY)["format"]
    require_objective_fits(model_config, formatted_format, model_config.dataset.source)
    start = starting_adapter(storage, model_config, partition)
    reference = require_reference(model_config, start, storage, quantized_base)
    if start is not None:
        inputs = {**inputs, "init_adapter": storage.content_digest(start.adapter)}
        key = inputs_key(inputs)
    parents = {"formatted_dataset": formatted_dataset, "quantized_base": quantized_base}
    facts = {"inputs_key": key, "objective": model_config.training.objective, "reference": reference,
             **({"init_adapter": start.as_entry()} if start is not None else {})}
    finished = storage.remembered(partition, STAGE, key)
    if finished is not None:
        context.log.info(f"an adapter made from these inputs (run {key}) is published at {finished.uri}; reusing it")
        storage.point_current(partition, STAGE, finished, run_order(context))
        folder = storage.local_path(finished)
        record = stage_lineage(context, model_config, storage, parents, **facts)
        tracked = tracker.adapter_run(model_config.tracking, owner, storage, finished, quantized_base,
                                      model_config.trust_remote_code)
        return _output(finished, record, model_config, read_json(folder / TRAINING_SUMMARY),
                       (folder / LOSS_CURVE).read_bytes(), start, reused=True, tracked=tracked)
    resume_from = resume_point(context, storage, key, inputs)
    base_dir = storage.local_path(quantized_base)
    train = pd.read_parquet(storage.local_path(formatted_dataset) / "train.parquet")
    settings = preference_settings(model_config)
    objective = model_config.training.objective
    context.log.info(f"{objective.upper()} on {len(train)} training rows, reference: {reference}; beta "
                     f"{model_config.preference.beta:g}, learning rate {model_config.training.learning_rate:g}")
    lineage = stage_lineage(context, model_config, storage, parents, **facts)
    with tracker.training(model_config.tracking, owner, partition, lineage) as live, \
            storage.staging_dir() as staging:
        result = train_preference(
            base_dir, train, staging, settings,
            start_adapter=storage.local_path(start.adapter) if start is not None else None,
            lora=model_config.lora, model_type=read_json(base_dir / "base_info.json").get("model_type"),
            progress=context.log.info,
            on_checkpoint=lambda folder, step: publish_checkpoint(context, storage, key, folder, step),
            resume_from=resume_from[1] if resume_from is not None else None,
            on_log=live.log if live is not None else None)
        # The template the pairs were rendered with travels with the adapter (and so the merged model).
        record_prompt_format(staging, model_config.dataset.template, "messages", model_config.trust_remote_code)
        summary = {**{name: value for name, value in vars(result).items()}, "objective": objective,
                   "train_loss": result.loss_history[-1] if result.loss_history else None, "inputs_key": key}
        loss_png = training_curves_png(summary, model_config.training.logging_steps)
        (staging / LOSS_CURVE).write_bytes(loss_png)
        write_json(staging / TRAINING_SUMMARY, summary)
        (staging / "README.md").write_text(_card(model_config, summary, reference), encoding="utf-8")
        record = stage_lineage(context, model_config, storage, parents, steps=result.steps, **facts)
        ref = publish_stage(context, storage, staging, record)
        storage.remember(partition, STAGE, key, ref)
        storage.drop_checkpoints(partition, STAGE, key)
        tracked = {} if live is None else live.finish(ref, storage.local_path(ref), base_dir, summary,
                                                      model_config.trust_remote_code)
    return _output(ref, record, model_config, summary, loss_png, start, reused=False, tracked=tracked)


def training_curves_png(summary: dict, logging_steps: int) -> bytes:
    """The logged loss, reward margin and reward accuracy against the optimizer step: a margin that stays at 0 is a
    run that learns nothing, whatever its loss does."""
    names = {"loss_history": "loss", "margin_history": "reward margin", "accuracy_history": "reward accuracy"}
    steps = summary.get("logged_steps") or []
    curves = {}
    for key, name in names.items():
        values = summary.get(key) or []
        at = steps if len(steps) == len(values) else [logging_steps * (i + 1) for i in range(len(values))]
        curves[name] = list(zip(at, values))
    return curves_png(curves, f"{summary.get('objective', 'preference').upper()} training")


def _card(model_config: ModelConfig, summary: dict, reference: str) -> str:
    objective = model_config.training.objective.upper()
    method = "QLoRA" if model_config.quantization.mode != "none" else "LoRA"
    margins = summary.get("margin_history") or []
    return "\n".join([
        "---", "library_name: peft", f"base_model: {model_config.base_model}", "tags: [lora, lora-pipeline, "
        f"{objective.lower()}]", "---", "", f"# {method} adapter for {model_config.base_model}, {objective}", "",
        f"Trained by lora-pipeline with TRL's {objective} trainer and PEFT on preference pairs.", "",
        f"- reference: {reference}",
        f"- beta {model_config.preference.beta:g}, loss {model_config.preference.loss_type}, learning rate "
        f"{model_config.training.learning_rate:g}",
        f"- optimizer steps: {summary['steps']}, last logged loss: {summary.get('train_loss')}",
        f"- reward margin, first and last logged: {margins[0] if margins else 'n/a'} -> "
        f"{margins[-1] if margins else 'n/a'}",
        "",
    ])


def _output(ref: ArtifactRef, record: dict, model_config: ModelConfig, summary: dict, loss_png: bytes,
            start: StartingAdapter | None, reused: bool, tracked: dict) -> dg.Output[ArtifactRef]:
    margins = summary.get("margin_history") or []
    accuracies = summary.get("accuracy_history") or []
    return stage_output(ref, record, model_config, {
        "reused": reused,
        "objective": model_config.training.objective,
        "reference": summary.get("reference", "base"),
        **({"init_adapter": start.describe(), "init_adapter_uri": dg.MetadataValue.path(start.adapter.uri)}
           if start is not None else {}),
        "loss_curve": dg.MetadataValue.md(markdown_image(loss_png, "training loss, reward margin and accuracy")),
        "final_logged_loss": summary.get("train_loss"),
        "first_reward_margin": margins[0] if margins else None,
        "last_reward_margin": margins[-1] if margins else None,
        "last_reward_accuracy": accuracies[-1] if accuracies else None,
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        **({"resumed_from_step": summary["resumed_from_step"]} if summary.get("resumed_from_step") else {}),
        **tracked,
    })
