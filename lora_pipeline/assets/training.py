"""Training the LoRA adapter."""

import dataclasses
import hashlib
import json

import dagster as dg
import pandas as pd

from lora_pipeline.assets.champion import champion_owner
from lora_pipeline.assets.common import (
    Reads,
    pipeline_asset,
    stage_lineage,
    publish_stage,
    read_json,
    resolve_model_config,
    run_order,
    stage_output,
    write_json,
)
from lora_pipeline.assets.data import FORMAT_SUMMARY
from lora_pipeline.assets.evaluation import EVAL_SPLIT
from lora_pipeline.assets.preference.training import train_preference_adapter
from lora_pipeline.assets.provenance import library_versions, parent_lineage, stage_config
from lora_pipeline.assets.stages import pipeline
from lora_pipeline.config.schema import ModelConfig, TuningRunConfig
from lora_pipeline.deploy import training_gpus
from lora_pipeline.ml.base.fit import check_fits
from lora_pipeline.ml.evaluation.suite import held_out_examples
from lora_pipeline.ml.prompt_format import record_prompt_format
from lora_pipeline.ml.report.modelcard import adapter_card
from lora_pipeline.ml.report.plots import loss_curve_png, markdown_image
from lora_pipeline.ml.training import StepOptions, TrainingDivergedError, TrainResult, step_options, train_adapter
from lora_pipeline.ml.training.distributed import Launch, plan_launch
from lora_pipeline.ml.training.telemetry import progress_line
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore
from lora_pipeline.resources.tracking import ExperimentTracker
from lora_pipeline.torchrun.launch import train_with_torchrun
from lora_pipeline.torchrun.worker import training_spec

TRAINING_SUMMARY = "training_summary.json"
TRAIN_SPLIT = "train.parquet"  # the one file of formatted_dataset that training reads
LOSS_CURVE = "loss_curve.png"
STAGE = "trained_adapter"


# The libraries that run the training: a checkpoint from another version of them may not load,
# or not continue the same way. The data libraries reach training only through the data's bytes.
TRAINING_STACK = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def training_inputs(model_config: ModelConfig, storage: ArtifactStore, formatted_dataset: ArtifactRef,
                    quantized_base: ArtifactRef) -> dict:
    """Everything an adapter depends on: the training split's and the base's content, the settings that
    change the result, this stage's code version and the versions of the libraries that train.

    Content, not versions: a parent re-made with the same bytes (after a data library upgrade, or a
    change of a data check's threshold) gets a new version but trains the same adapter, which is
    then reused instead of trained again.
    """
    inputs = {
        "data": storage.content_digest(formatted_dataset, only=(TRAIN_SPLIT,)),
        "base": storage.content_digest(quantized_base),
        **stage_config(model_config, "trained_adapter"),
        "code_version": pipeline()["trained_adapter"].code_version,
        "libraries": {name: version for name, version in library_versions().items() if name in TRAINING_STACK},
    }
    if model_config.training.eval_steps:  # the held-out examples decide the best step and when to stop
        inputs["held_out"] = {"data": storage.content_digest(formatted_dataset, only=(EVAL_SPLIT,)),
                              "max_examples": model_config.eval.max_examples}
    return inputs


def inputs_key(inputs: dict) -> str:
    """A short name for a set of training inputs: equal inputs, equal key."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def what_changed(before: dict, after: dict) -> list[str]:
    """The differences between two sets of training inputs, as 'key: old -> new', data and base named."""
    names = {"data": "formatted_dataset", "base": "quantized_base"}
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{change}" for change in what_changed(old, new)]
        elif old != new:
            if key in names:
                changes.append(f"{names[key]} holds other content ({str(old)[:12]} -> {str(new)[:12]})")
            else:
                changes.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return changes


def _explain_fresh_start(storage: ArtifactStore, partition: str, run_key: str, inputs: dict) -> str | None:
    """Why checkpoints in the store are not resumed (they were made from other inputs), or None if there are none."""
    reasons = []
    for other in storage.checkpoint_runs(partition, "trained_adapter"):
        if other == run_key:
            continue
        latest = storage.latest_checkpoint(partition, "trained_adapter", other)
        if latest is None:
            continue
        before = storage.checkpoint_inputs(partition, "trained_adapter", other) or {}
        changes = what_changed(before, inputs) if before else ["their inputs were not recorded"]
        reasons.append(f"step {latest[0]} of run {other}: " + "; ".join(changes))
    if not reasons:
        return None
    return ("not resuming the checkpoints in the store, which were made from other inputs (" + " | ".join(reasons)
            + "); training starts at step 0")


def resume_point(context: dg.AssetExecutionContext, storage: ArtifactStore, run_key: str, inputs: dict):
    """(step, folder) of the newest checkpoint made from these inputs, or None, saying why others are not
    resumed; records the inputs so a later run can say what changed. SFT and preference runs alike."""
    partition = context.partition_key
    latest = storage.latest_checkpoint(partition, STAGE, run_key)
    if latest is not None:
        context.log.info(f"resuming from the checkpoint at step {latest[0]} (run {run_key})")
    elif (explanation := _explain_fresh_start(storage, partition, run_key, inputs)) is not None:
        context.log.warning(explanation)
    storage.record_checkpoint_inputs(partition, STAGE, run_key, inputs)
    return latest


def publish_checkpoint(context: dg.AssetExecutionContext, storage: ArtifactStore, run_key: str, folder,
                       step: int) -> None:
    """A Trainer checkpoint into the store, under the run's inputs key, and a line saying where."""
    uri = storage.publish_checkpoint(folder, context.partition_key, STAGE, run_key, step)
    context.log.info(f"checkpoint at step {step}: {uri}")


@pipeline_asset(
    kinds={"pytorch", "safetensors"}, group="model", uses_gpu=True, gpus=training_gpus(),
    code_version="4",  # 4: the training template in the adapter's tokenizer; 3: the lean step (own loss, per-document attention, padding-free batches, shared dropout)
    reads=Reads(config=("training", "lora", "trust_remote_code", "preference"),
                ignoring=("training.checkpoint_every", "training.logging_steps")),
)
def trained_adapter(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    compute: Compute,
    tracker: ExperimentTracker,
    formatted_dataset: ArtifactRef,
    quantized_base: ArtifactRef,
) -> dg.Output[ArtifactRef]:
    """The LoRA adapter trained with TRL's SFTTrainer and PEFT on the quantized base (QLoRA when quantized).

    Training checkpoints go to the store; a relaunch after a crash resumes from the newest one made
    from the same inputs, and an adapter already made from the same inputs is reused, not retrained.
    With `tracking.report_to: [mlflow]` the training is one MLflow run (linked in the metadata).
    """
    model_config = resolve_model_config(context, config, registry)
    if model_config.preference_tuning:
        inputs = training_inputs(model_config, storage, formatted_dataset, quantized_base)
        return train_preference_adapter(context, model_config, storage, formatted_dataset, quantized_base, inputs,
                                        inputs_key(inputs), tracker, champion_owner(context, registry))
    run = _TrainingRun(context, model_config, storage, compute,
                       {"formatted_dataset": formatted_dataset, "quantized_base": quantized_base},
                       tracker, champion_owner(context, registry))
    finished = storage.remembered(run.partition, STAGE, run.key)
    if finished is not None:
        return run.reuse(finished)
    resume_from = run.resume_point()
    ref, record, result, loss_png, tracked = run.train_and_publish(formatted_dataset, quantized_base, resume_from)
    return _adapter_output(ref, record, model_config, result, loss_png, reused=False, tracked=tracked)


class _TrainingRun:
    """One materialization of trained_adapter, in named steps: reuse, resume, train and publish."""

    def __init__(self, context: dg.AssetExecutionContext, model_config: ModelConfig, storage: ArtifactStore,
                 compute: Compute, parents: dict[str, ArtifactRef], tracker: ExperimentTracker, owner: str) -> None:
        self.context, self.model_config, self.storage, self.compute = context, model_config, storage, compute
        self.parents, self.tracker, self.owner = parents, tracker, owner
        self.partition = context.partition_key
        self.device = compute.info()
        self.inputs = training_inputs(model_config, storage, parents["formatted_dataset"], parents["quantized_base"])
        self.key = inputs_key(self.inputs)

    def lineage(self, **facts) -> dict:
        return stage_lineage(self.context, self.model_config, self.storage, self.parents, device=self.device,
                             inputs_key=self.key, compute=self.compute.choices(self.model_config), **facts)

    def reuse(self, finished: ArtifactRef) -> dg.Output[ArtifactRef]:
        """Point at the adapter already made from these inputs instead of training again."""
        self.context.log.info(f"an adapter made from these inputs (run {self.key}) is published at "
                              f"{finished.uri}; reusing it instead of training again")
        self.storage.point_current(self.partition, STAGE, finished, run_order(self.context))
        folder = self.storage.local_path(finished)
        summary = read_json(folder / TRAINING_SUMMARY)
        # An adapter trained before a field existed has that field's default.
        result = TrainResult(**{field.name: summary[field.name] for field in dataclasses.fields(TrainResult)
                                if field.name in summary})
        record = self.lineage(memory_plan=parent_lineage(folder).get("memory_plan"))  # as planned when it trained
        tracked = self.tracker.adapter_run(self.model_config.tracking, self.owner, self.storage, finished,
                                           self.parents["quantized_base"], self.model_config.trust_remote_code)
        return _adapter_output(finished, record, self.model_config, result, (folder / LOSS_CURVE).read_bytes(),
                               reused=True, tracked=tracked)

    @property
    def held_out_file(self):
        """formatted_dataset's eval split: what the evaluations while training score (training.eval_steps)."""
        return self.storage.local_path(self.parents["formatted_dataset"]) / EVAL_SPLIT

    def held_out(self) -> pd.DataFrame | None:
        """The held-out examples scored while training (eval_report's), when training.eval_steps asks for it."""
        if not self.model_config.training.eval_steps:
            return None
        return held_out_examples(self.held_out_file, self.model_config.eval.max_examples)

    def resume_point(self):
        """The newest checkpoint made from these inputs (or None), saying why others are not resumed."""
        return resume_point(self.context, self.storage, self.key, self.inputs)

    def report(self, progress: dict) -> None:
        self.context.log.info(progress_line(progress))

    def publish_checkpoint(self, folder, step: int) -> None:
        publish_checkpoint(self.context, self.storage, self.key, folder, step)

    def train_and_publish(self, formatted_dataset: ArtifactRef, quantized_base: ArtifactRef, resume_from):
        """Train (after the memory check), write the loss curve, summary and card, publish; drop the checkpoints."""
        model_config, storage = self.model_config, self.storage
        train_file = storage.local_path(formatted_dataset) / TRAIN_SPLIT
        base_dir = storage.local_path(quantized_base)
        launch = plan_launch(model_config.training.distributed, self.device)  # refusals before anything loads
        advice = read_json(storage.local_path(formatted_dataset) / FORMAT_SUMMARY).get("length_advice") or {}
        # Before the model is loaded, per rank; no suggested max_length cuts more than 5% of the examples.
        plan = check_fits(model_config, self.device, base_dir, shortest=advice.get("keeps_95") or 64)
        base_name = quantized_base.uri if model_config.builtin_base else model_config.base_model
        options = step_options(model_config.training, self.device, dequant_cache=bool(plan and plan.dequant_cache))
        with self.tracker.training(model_config.tracking, self.owner, self.partition, self.lineage()) as live, \
                storage.staging_dir() as staging:
            result = self.train(base_dir, train_file, staging, base_name, resume_from, options,
                                live.log if live is not None else None, launch)
            # The template the data was rendered with travels with the adapter (and so the merged model).
            data_format = read_json(storage.local_path(formatted_dataset) / FORMAT_SUMMARY)["format"]
            record_prompt_format(staging, model_config.dataset.template, data_format, model_config.trust_remote_code)
            loss_png = loss_curve_png(result.loss_history, held_out=result.eval_history,
                                      published_step=result.published_step)
            (staging / LOSS_CURVE).write_bytes(loss_png)
            write_json(staging / TRAINING_SUMMARY, {**vars(result), "inputs_key": self.key})
            record = self.lineage(steps=result.steps, train_loss=result.train_loss,
                                  memory_plan=plan.terms() if plan is not None else None)
            (staging / "README.md").write_text(adapter_card(model_config, result, base_name, record), encoding="utf-8")
            ref = publish_stage(self.context, storage, staging, record)
            storage.remember(self.partition, STAGE, self.key, ref)
            storage.drop_checkpoints(self.partition, STAGE, self.key)
            tracked = {} if live is None else live.finish(ref, storage.local_path(ref), base_dir, vars(result),
                                                          model_config.trust_remote_code)
        return ref, record, result, loss_png, tracked

    def train(self, base_dir, train_file, staging, base_name: str, resume_from,
              options: StepOptions, on_log=None, launch: Launch | None = None) -> TrainResult:
        """Train, in this process or on several through torchrun; a diverged run names the last good checkpoint
        it kept."""
        model_config = self.model_config
        arguments = {
            "base_model_name": base_name,
            "resume_from": resume_from[1] if resume_from is not None else None,
            "trust_remote_code": model_config.trust_remote_code,
            # MLflow is the pipeline's own (on_log); the Trainer reports to the other trackers itself.
            "report_to": tuple(name for name in model_config.tracking.report_to if name != "mlflow"),
        }
        try:
            if launch is not None and launch.distributed:
                spec = training_spec(base_dir, train_file, staging, model_config.lora, model_config.training,
                                     self.device, options, **arguments,
                                     held_out_file=self.held_out_file, eval_settings=model_config.eval)
                # A staging folder, not /tmp: a local store's writers remove what a killed step left there.
                with self.storage.staging_dir() as work:
                    return train_with_torchrun(self.context, launch, spec, work, self.publish_checkpoint, on_log)
            return train_adapter(
                base_dir, pd.read_parquet(train_file), staging, model_config.lora, model_config.training, self.device,
                progress=self.report, on_checkpoint=self.publish_checkpoint, options=options, on_log=on_log,
                launch=launch, held_out=self.held_out(), eval_batch_size=model_config.eval.batch_size, **arguments,
            )
        except TrainingDivergedError as diverged:
            kept = self.storage.latest_checkpoint(self.partition, STAGE, self.key)
            if kept is None:
                raise
            raise TrainingDivergedError(f"{diverged}. The last good checkpoint, step {kept[0]}, is kept in the "
                                        "store (a relaunch with unchanged settings and data resumes from it)") from None


def _adapter_output(ref: ArtifactRef, record: dict, model_config: ModelConfig, result: TrainResult,
                    loss_png: bytes, reused: bool, tracked: dict) -> dg.Output[ArtifactRef]:
    return stage_output(
        ref, record, model_config,
        {
            "reused": reused,
            "loss_curve": dg.MetadataValue.md(markdown_image(
                loss_png, "training and held-out loss" if result.eval_history else "training loss")),
            "train_loss": result.train_loss,
            "final_logged_loss": result.final_loss,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            **_held_out_metadata(result),
            "trainable_parameters": result.trainable_parameters,
            "trainable_percent": round(100 * result.trainable_parameters / max(result.total_parameters, 1), 4),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "train_seconds": round(result.train_seconds, 2),
            "train_tokens": result.train_tokens,
            "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1),
            **_estimate_metadata(record.get("memory_plan"), result.peak_memory_bytes),
            "peak_memory_kind": result.peak_memory_kind,
            "precision": result.precision,
            "trainable_dtype": result.trainable_dtype,
            "pad_fraction": round(result.pad_fraction, 4),
            "world_size": result.world_size,
            "distributed_type": result.distributed_type,
            "training_step": dg.MetadataValue.json(result.step_options),
            "gradient_checkpointing": result.gradient_checkpointing,
            "target_modules": 
                result.target_modules if isinstance(result.target_modules, str) else ", ".join(result.target_modules)
            ,
            **tracked,
        },
    )


def _held_out_metadata(result: TrainResult) -> dict:
    """The evaluations while training, when there were any: the last and best held-out loss, and which step was
    published (the best one with training.keep_best) or where early stopping ended the run."""
    if not result.eval_history:
        return {}
    return {
        "held_out_loss": round(result.eval_history[-1][1], 4),  # the last evaluation
        "best_held_out_loss": round(result.best_eval_loss, 4) if result.best_eval_loss is not None else None,
        "best_step": result.best_step,
        "published_step": result.published_step,
        "stopped_early_at": result.stopped_early_at,
        "evaluations": len(result.eval_history),
    }


def _estimate_metadata(terms: dict | None, measured: int) -> dict:
    """The memory planner's estimate next to the measured peak."""
    if not terms:
        return {}
    estimate = sum(terms.values())
    return {
        "memory_estimate_mb": round(estimate / 2**20, 1),
        "memory_estimate_error": round(estimate / measured - 1, 4) if measured else 0.0,
        "memory_plan": {name: round(value / 2**20, 1) for name, value in terms.items()},
    }
