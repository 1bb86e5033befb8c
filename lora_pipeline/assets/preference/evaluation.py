"""eval_report for a preference model: held-out pairs scored by the tuned adapter, its reference, the current champion
and the merged model (ml/preference/report.py), stored where the gates and the leaderboard read them."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from lora_pipeline.assets.common import publish_stage, stage_lineage, stage_output, write_json
from lora_pipeline.assets.starting import starting_adapter
from lora_pipeline.config.schema import ModelConfig
from lora_pipeline.ml.report.metrics_report import EXAMPLES_FILE
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore
from lora_pipeline.resources.tracking import ExperimentTracker

EVAL_SPLIT = "eval.parquet"


def evaluate_preference_model(context: dg.AssetExecutionContext, model_config: ModelConfig, storage: ArtifactStore,
                              device, parents: dict[str, ArtifactRef], champion, weights: dict,
                              tracker: ExperimentTracker, owner: str) -> dg.Output[ArtifactRef]:
    """Score, write metrics.json, examples.parquet and report.md, publish; metadata for the UI, and with MLflow
    the metrics into the adapter's run. champion: the current champion's (scores key, adapter folder, version)
    when comparable; weights: what identifies the base's and the adapter's weights (the champion stage records
    them)."""
    from lora_pipeline.ml.preference.report import PREFERENCE_METRIC, evaluate_preferences, report_markdown

    settings = model_config.eval
    start = starting_adapter(storage, model_config, context.partition_key)
    reference = start.describe() if start is not None else "the base (adapters disabled)"
    pairs = pd.read_parquet(storage.local_path(parents["formatted_dataset"]) / EVAL_SPLIT).head(settings.max_examples)
    if pairs.empty:
        raise dg.Failure("the held-out split has no pairs to evaluate; raise dataset.eval_fraction or add pairs")
    document, table = evaluate_preferences(
        storage.local_path(parents["quantized_base"]), storage.local_path(parents["trained_adapter"]),
        storage.local_path(start.adapter) if start is not None else None, storage.local_path(parents["merged_model"]),
        pairs, model_config.preference.beta, settings.bootstrap_resamples, model_config.promotion.min_improvement,
        device, champion_dir=champion[1] if champion is not None else None, probe=settings.forgetting_probe,
        samples=settings.samples, max_new_tokens=settings.max_new_tokens, log=context.log.info,
        trust_remote_code=model_config.trust_remote_code, batch_size=settings.batch_size)
    document.update({"objective": model_config.training.objective, "reference": reference,
                     "beta": model_config.preference.beta, "metric": PREFERENCE_METRIC})
    document["comparison"]["merge_weights"] = "dequantized" if model_config.quantization.mode != "none" else "original"
    report = report_markdown(document, f"Evaluation: {context.partition_key} ({model_config.training.objective})",
                             reference)
    with storage.staging_dir() as staging:
        write_json(staging / "metrics.json", document)
        table.to_parquet(staging / EXAMPLES_FILE, index=False)
        (staging / "report.md").write_text(report, encoding="utf-8")
        record = stage_lineage(context, model_config, storage, parents, device=device,
                               suite=f"pairs-{len(pairs)}", reference=reference, weights=weights,
                               **({"init_adapter": start.as_entry()} if start is not None else {}))
        ref = publish_stage(context, storage, staging, record)
    intervals = document["comparison"]["intervals"]
    accuracy = {name: values[PREFERENCE_METRIC] for name, values in intervals.items()}
    tuned_vs_reference = document["comparison"]["paired"][0]
    context.log.info(f"held-out preference accuracy {accuracy['adapter']['value']:.3f} (95% CI "
                     f"{accuracy['adapter']['ci95'][0]:.3f} to {accuracy['adapter']['ci95'][1]:.3f}) against "
                     f"{accuracy['reference']['value']:.3f} for the reference: {tuned_vs_reference['verdict']}")
    forgetting = document["comparison"].get("forgetting")
    metrics = {
        **{f"{name}_preference_accuracy": values["value"] for name, values in accuracy.items()},
        **{f"{name}_{metric}": float(values[metric]["value"]) for name, values in intervals.items()
           for metric in ("likelihood_accuracy", "reward_margin")},
        "merged_vs_adapter_loss_change": document["comparison"]["merged_vs_adapter_loss_change"],
        **({"forgetting_change": forgetting["relative_change"]} if forgetting else {}),
    }
    tracked = tracker.evaluated(model_config.tracking, owner, storage, parents["trained_adapter"],
                                parents["quantized_base"], metrics, model_config.trust_remote_code)
    return stage_output(ref, record, model_config, {
        "objective": model_config.training.objective,
        "reference": reference,
        "eval_pairs": len(pairs),
        **metrics,
        "adapter_preference_accuracy_ci95": str([round(x, 4) for x in accuracy["adapter"]["ci95"]]),
        "adapter_preference_accuracy_vs_reference": tuned_vs_reference["verdict"],
        "report": dg.MetadataValue.md(report),
        **tracked,
    })
