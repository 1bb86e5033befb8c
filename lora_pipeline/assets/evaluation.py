"""The held-out comparison of base, adapter and merged model."""

import dagster as dg
import pandas as pd

from lora_pipeline.assets.base import original_weights_dir
from lora_pipeline.assets.common import (
    Reads,
    merge_weights_kind,
    pipeline_asset,
    stage_lineage,
    publish_stage,
    resolve_model_config,
    stage_output,
)
from lora_pipeline.config.schema import TuningRunConfig
from lora_pipeline.ml.evaluation import evaluate_pipeline
from lora_pipeline.ml.base.loading import is_quantized_dir
from lora_pipeline.ml.report.modelcard import with_evaluation
from lora_pipeline.ml.report.metrics_report import write_report
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore


@pipeline_asset(
    kinds={"pytorch"}, group="evaluation", uses_gpu=True,
    code_version="2",  # 2: writes its figures into the adapter's and the merged model's cards
    reads=Reads(config=("eval", "merge", "trust_remote_code")),
)
def eval_report(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    hub: ModelHub,
    compute: Compute,
    formatted_dataset: ArtifactRef,
    quantized_base: ArtifactRef,
    trained_adapter: ArtifactRef,
    merged_model: ArtifactRef,
) -> dg.Output[ArtifactRef]:
    """Held-out loss, perplexity and token accuracy of base, adapter and merged model, with generation samples: metrics.json + report.md.

    The figures are also written into the adapter's and the merged model's model cards (README.md),
    so they travel with those files.
    """
    model_config = resolve_model_config(context, config, registry)
    settings = model_config.eval
    quantized_dir = storage.local_path(quantized_base)
    quantized = is_quantized_dir(quantized_dir)
    merge_weights = merge_weights_kind(model_config.merge.base_weights, quantized)
    compare_original = quantized and merge_weights == "dequantized" and settings.compare_merge_bases
    eval_frame = pd.read_parquet(storage.local_path(formatted_dataset) / "eval.parquet").head(settings.max_examples)
    device = compute.info()
    result = evaluate_pipeline(
        quantized_dir,
        storage.local_path(trained_adapter),
        storage.local_path(merged_model),
        eval_frame,
        batch_size=settings.batch_size,
        sample_count=settings.samples,
        max_new_tokens=settings.max_new_tokens,
        device=device,
        original_dir=original_weights_dir(quantized_dir, hub, model_config.trust_remote_code) if compare_original else None,
        log=context.log.info,
        trust_remote_code=model_config.trust_remote_code,
    )
    with storage.staging_dir() as staging:
        document = write_report(result, staging, merge_weights, f"Evaluation: {context.partition_key}")
        report = (staging / "report.md").read_text(encoding="utf-8")
        record = stage_lineage(context, model_config, storage, {"formatted_dataset": formatted_dataset,
                            "quantized_base": quantized_base, "trained_adapter": trained_adapter,
                            "merged_model": merged_model}, device=device)
        ref = publish_stage(context, storage, staging, record)
    made_by = f"the eval report {ref.uri} (data version {record['version']})"
    for role, model_ref in (("adapter", trained_adapter), ("merged", merged_model)):
        card = (storage.local_path(model_ref) / "README.md").read_text(encoding="utf-8")
        storage.amend_card(model_ref, with_evaluation(card, document, role, context.partition_key,
                                                      model_config.dataset.source, made_by), made_by)
    context.log.info("the adapter's and the merged model's model cards now carry these figures")
    comparison = document["comparison"]
    metrics = {
        f"{model}_{name}": float(value)
        for model, values in document.items()
        if model != "comparison"
        for name, value in values.items()
        if name in ("loss", "perplexity", "token_accuracy")
    }
    return stage_output(
        ref, record, model_config,
        {
            **metrics,
            "adapter_vs_base_loss_change": comparison["adapter_vs_base_loss_change"],
            "merged_vs_adapter_loss_change": comparison["merged_vs_adapter_loss_change"],
            "eval_examples": result.examples,
            "report": dg.MetadataValue.md(report.replace("![held-out loss](loss_by_model.png)", "")),
        },
    )
