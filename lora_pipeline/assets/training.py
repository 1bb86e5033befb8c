"""Training the LoRA adapter."""

import hashlib
import json

import dagster as dg
import pandas as pd

from lora_pipeline.assets.common import (
    config_metadata,
    pipeline_asset,
    ref_metadata,
    resolve_model_config,
    write_json,
)
from lora_pipeline.config.schema import ModelConfig, TuningRunConfig
from lora_pipeline.ml.modelcard import adapter_card
from lora_pipeline.ml.plots import loss_curve_png, markdown_image
from lora_pipeline.ml.tiny import BUILTIN_PREFIX
from lora_pipeline.ml.train import train_adapter
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore


def resume_key(model_config: ModelConfig, formatted_dataset: ArtifactRef, quantized_base: ArtifactRef) -> str:
    """What a checkpoint must match to be resumed: the data and base versions and the training-relevant config."""
    training = model_config.training.model_dump(mode="json")
    for setting in ("checkpoint_every", "logging_steps"):  # how often to save or log does not change the result
        training.pop(setting)
    payload = json.dumps(
        {"data": formatted_dataset.sha256, "base": quantized_base.sha256, "training": training,
         "lora": model_config.lora.model_dump(mode="json")},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@pipeline_asset(kinds={"pytorch", "safetensors"}, group="model", uses_gpu=True)
def trained_adapter(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    compute: Compute,
    formatted_dataset: ArtifactRef,
    quantized_base: ArtifactRef,
) -> dg.Output[ArtifactRef]:
    """The LoRA adapter trained with TRL's SFTTrainer and PEFT on the quantized base (QLoRA when quantized)."""
    model_config = resolve_model_config(context, config, registry)
    train = pd.read_parquet(storage.local_path(formatted_dataset) / "train.parquet")
    base_dir = storage.local_path(quantized_base)

    def report(progress: dict) -> None:
        context.log.info(
            f"step {progress['step']}/{progress['max_steps']} loss {progress['loss']:.4f} "
            f"lr {progress['learning_rate']:.2e} {progress['tokens_per_second']:.0f} tokens/s "
            f"eta {progress['eta_seconds']:.0f}s"
        )

    partition = context.partition_key
    run_key = resume_key(model_config, formatted_dataset, quantized_base)
    latest = storage.latest_checkpoint(partition, "trained_adapter", run_key)
    if latest is not None:
        context.log.info(f"resuming from the checkpoint at step {latest[0]} (run {run_key})")
    elif any(key != run_key for key in storage.checkpoint_runs(partition, "trained_adapter")):
        context.log.warning(
            "not resuming: the checkpoints in the store were made with another config, data or base model "
            f"(this run is {run_key}); training starts at step 0"
        )

    def publish_checkpoint(folder, step: int) -> None:
        uri = storage.publish_checkpoint(folder, partition, "trained_adapter", run_key, step)
        context.log.info(f"checkpoint at step {step}: {uri}")

    base_name = model_config.base_model if not model_config.base_model.startswith(BUILTIN_PREFIX) else quantized_base.uri
    with storage.staging_dir() as staging:
        result = train_adapter(
            base_dir, train, staging, model_config.lora, model_config.training, compute.info(), base_name, report,
            on_checkpoint=publish_checkpoint, resume_from=latest[1] if latest is not None else None,
            trust_remote_code=model_config.trust_remote_code,
        )
        loss_png = loss_curve_png(result.loss_history)
        (staging / "loss_curve.png").write_bytes(loss_png)
        summary = {k: v for k, v in vars(result).items() if k != "loss_history"}
        write_json(staging / "training_summary.json", {**summary, "loss_history": result.loss_history})
        (staging / "README.md").write_text(adapter_card(model_config, result, base_name), encoding="utf-8")
        ref = storage.publish(staging, context.partition_key, "trained_adapter")
    storage.drop_checkpoints(partition, "trained_adapter", run_key)
    return dg.Output(
        ref,
        metadata={
            **ref_metadata(ref),
            **config_metadata(model_config),
            "loss_curve": dg.MetadataValue.md(markdown_image(loss_png, "training loss")),
            "train_loss": dg.MetadataValue.float(result.train_loss),
            "final_logged_loss": dg.MetadataValue.float(result.final_loss),
            "steps": dg.MetadataValue.int(result.steps),
            "resumed_from_step": dg.MetadataValue.int(result.resumed_from_step),
            "trainable_parameters": dg.MetadataValue.int(result.trainable_parameters),
            "trainable_percent": dg.MetadataValue.float(
                round(100 * result.trainable_parameters / max(result.total_parameters, 1), 4)
            ),
            "tokens_per_second": dg.MetadataValue.float(round(result.tokens_per_second, 1)),
            "train_seconds": dg.MetadataValue.float(round(result.train_seconds, 2)),
            "train_tokens": dg.MetadataValue.int(result.train_tokens),
            "peak_memory_mb": dg.MetadataValue.float(round(result.peak_memory_bytes / 2**20, 1)),
            "peak_memory_kind": dg.MetadataValue.text(result.peak_memory_kind),
            "precision": dg.MetadataValue.text(result.precision),
            "gradient_checkpointing": dg.MetadataValue.bool(result.gradient_checkpointing),
            "target_modules": dg.MetadataValue.text(
                result.target_modules if isinstance(result.target_modules, str) else ", ".join(result.target_modules)
            ),
        },
    )
