"""The held-out comparison of base, adapter and merged model, example by example and with intervals."""

import dagster as dg

from lora_pipeline.assets.base import original_weights_dir
from lora_pipeline.assets.champion import champion_owner, comparable_champion
from lora_pipeline.assets.preference.evaluation import evaluate_preference_model
from lora_pipeline.assets.common import (
    Reads,
    merge_weights_kind,
    pipeline_asset,
    stage_lineage,
    publish_stage,
    resolve_model_config,
    stage_output,
    write_json,
)
from lora_pipeline.config.schema import TuningRunConfig
from lora_pipeline.ml.base.loading import is_quantized_dir
from lora_pipeline.ml.evaluation.pipeline import evaluate_pipeline
from lora_pipeline.ml.evaluation.suite import EvalSuite, held_out_examples, suite_digest
from lora_pipeline.ml.report.metrics_report import write_report
from lora_pipeline.ml.report.modelcard import model_index
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.records import ScoreCache
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore
from lora_pipeline.resources.tracking import ExperimentTracker

EVAL_SPLIT = "eval.parquet"


def eval_suite(storage: ArtifactStore, formatted_dataset: ArtifactRef, settings) -> tuple[EvalSuite, str]:
    """The suite every model of this config is scored on, and its digest (the key of cached scores)."""
    frame = held_out_examples(storage.local_path(formatted_dataset) / EVAL_SPLIT, settings.max_examples)
    suite = EvalSuite(frame, tuple(settings.metrics), settings.max_new_tokens, settings.batch_size)
    return suite, suite_digest(storage.content_digest(formatted_dataset, only=(EVAL_SPLIT,)), suite)


def weights_keys(storage: ArtifactStore, quantized_base: ArtifactRef, trained_adapter: ArtifactRef,
                 merged_model: ArtifactRef, original: bool) -> dict[str, str]:
    """What identifies each evaluated model's weights: the content of its files, not who made them (an artifact's
    sha256 covers its lineage, so equal weights made by two models differ there). An adapter means something only
    on its base."""
    base, adapter = storage.content_digest(quantized_base)[:16], storage.content_digest(trained_adapter)[:16]
    keys = {"base": base, "adapter": f"{base}-{adapter}", "merged": storage.content_digest(merged_model)[:16]}
    if original:
        keys["merged_into_original"] = f"original-{base}-{adapter}"
    return keys


@pipeline_asset(
    kinds={"pytorch"}, group="evaluation", uses_gpu=True,
    # 3: per-example metrics with intervals, the forgetting probe; published cards no longer amended
    code_version="3",
    reads=Reads(config=("eval", "merge", "trust_remote_code", "promotion.min_improvement", "preference.beta")),
)
def eval_report(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    hub: ModelHub,
    compute: Compute,
    tracker: ExperimentTracker,
    formatted_dataset: ArtifactRef,
    quantized_base: ArtifactRef,
    trained_adapter: ArtifactRef,
    merged_model: ArtifactRef,
) -> dg.Output[ArtifactRef]:
    """Base, adapter and merged model scored example by example on the held-out split: loss, token
    accuracy and each greedy answer's exact/normalized match, ROUGE-L and chrF (examples.parquet),
    paired comparisons with bootstrap 95% intervals and a verdict in words, the forgetting probe on
    general text (metrics.json, report.md).

    Scores are cached in the store by (weights, suite): comparing the same weights on the same
    examples again recomputes nothing. When the model (or its sweep) has a champion on the same base,
    it is scored beside the candidate, so the report shows base, candidate and champion answering the
    same prompts. Published artifacts are never changed: the card that carries the verdict ships with
    the champion. With `tracking.report_to: [mlflow]` the metrics go into the adapter's MLflow run and the
    adapter is registered with the alias `challenger`.
    """
    model_config = resolve_model_config(context, config, registry)
    if model_config.preference_tuning:
        parents = {"formatted_dataset": formatted_dataset, "quantized_base": quantized_base,
                   "trained_adapter": trained_adapter, "merged_model": merged_model}
        base, adapter = storage.content_digest(quantized_base)[:16], storage.content_digest(trained_adapter)[:16]
        champion = comparable_champion(storage, champion_owner(context, registry), base, f"{base}-{adapter}")
        return evaluate_preference_model(context, model_config, storage, compute.info(), parents, champion,
                                         {"base": base, "adapter": f"{base}-{adapter}"}, tracker,
                                         champion_owner(context, registry))
    settings = model_config.eval
    quantized_dir = storage.local_path(quantized_base)
    quantized = is_quantized_dir(quantized_dir)
    merge_weights = merge_weights_kind(model_config.merge.base_weights, quantized)
    compare_original = quantized and merge_weights == "dequantized" and settings.compare_merge_bases
    suite, digest = eval_suite(storage, formatted_dataset, settings)
    cache = ScoreCache(storage)
    keys = weights_keys(storage, quantized_base, trained_adapter, merged_model, compare_original)
    champion = comparable_champion(storage, champion_owner(context, registry), keys["base"], keys["adapter"])
    if champion is not None:
        keys["champion"] = champion[0]
        context.log.info(f"the current champion ({champion[2]}) is scored beside the candidate, on the same examples")
    cached = {name: found for name, key in keys.items() if (found := cache.get(key, digest)) is not None}
    if cached:
        context.log.info(f"scores of {', '.join(cached)} on this suite are cached ({digest}): not recomputed")
    device = compute.info()
    result = evaluate_pipeline(
        quantized_dir,
        storage.local_path(trained_adapter),
        storage.local_path(merged_model),
        suite,
        device,
        sample_count=settings.samples,
        resamples=settings.bootstrap_resamples,
        margin=model_config.promotion.min_improvement,
        other_adapters={"champion": champion[1]} if champion is not None else None,
        original_dir=original_weights_dir(quantized_dir, hub, model_config.trust_remote_code) if compare_original else None,
        cached=cached,
        probe=settings.forgetting_probe,
        benchmarks={"tasks": list(settings.benchmarks), "include_path": settings.benchmark_tasks_dir,
                    "limit": settings.benchmark_limit},
        log=context.log.info,
        trust_remote_code=model_config.trust_remote_code,
    )
    for name in result.scored_now:
        cache.put(keys[name], digest, result.per_example[name])
    with storage.staging_dir() as staging:
        document = write_report(result, staging, merge_weights, f"Evaluation: {context.partition_key}",
                                prompts=list(suite.frame["prompt"]), metric=model_config.promotion.metric)
        report = (staging / "report.md").read_text(encoding="utf-8")
        # The candidate's results in the Hub's model-index format, whether or not it becomes the champion.
        write_json(staging / "model-index.json", {"model-index": model_index(
            document, "adapter", context.partition_key, model_config.dataset.source_label)})
        record = stage_lineage(context, model_config, storage, {"formatted_dataset": formatted_dataset,
                            "quantized_base": quantized_base, "trained_adapter": trained_adapter,
                            "merged_model": merged_model}, device=device, suite=digest, weights=keys)
        ref = publish_stage(context, storage, staging, record)
    comparison = document["comparison"]
    metrics = {
        f"{model}_{name}": float(value)
        for model, values in document.items()
        if model != "comparison"
        for name, value in values.items()
        if name in ("loss", "perplexity", "token_accuracy") or name.startswith("mean_")
    }
    changes = {name: comparison[name] for name in ("adapter_vs_base_loss_change", "merged_vs_adapter_loss_change")}
    forgetting = ({"forgetting_change": comparison["forgetting"]["relative_change"]}
                  if "forgetting" in comparison else {})
    tracked = tracker.evaluated(model_config.tracking, champion_owner(context, registry), storage, trained_adapter,
                                quantized_base, {**metrics, **changes, **forgetting}, model_config.trust_remote_code)
    return stage_output(
        ref, record, model_config,
        {
            **metrics,
            **{f"adapter_{entry['metric']}_vs_base": entry["verdict"] for entry in comparison["paired"]
               if entry["candidate"] == "adapter" and entry["reference"] == "base"},
            **forgetting,
            "eval_suite": digest,
            "scored_now": ", ".join(result.scored_now) or "nothing (all cached)",
            **changes,
            "eval_examples": result.examples,
            # A mixture's held-out loss per source (the report's table has every model's).
            **({"adapter_loss_per_source": {name: round(value["adapter"], 4) for name, value in result.per_source.items()}}
               if result.per_source else {}),
            "report": dg.MetadataValue.md(report.replace("![held-out loss](loss_by_model.png)", "")),
            **tracked,
        },
    )
