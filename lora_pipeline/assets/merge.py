"""Folding the adapter into full-precision base weights."""

import dagster as dg
import pandas as pd

from lora_pipeline.assets.base import original_weights_dir, source_dtype
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
from lora_pipeline.ml.base.loading import is_quantized_dir
from lora_pipeline.ml.merge import merge_to_dir
from lora_pipeline.ml.report.modelcard import merged_card
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

PROBE_EXAMPLES = 8


@pipeline_asset(
    kinds={"pytorch", "safetensors"}, group="model", uses_gpu=True, code_version="2",  # 2: stops at the tokenizer EOS
    reads=Reads(config=("merge", "trust_remote_code")),
)
def merged_model(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    hub: ModelHub,
    formatted_dataset: ArtifactRef,
    quantized_base: ArtifactRef,
    trained_adapter: ArtifactRef,
) -> dg.Output[ArtifactRef]:
    """The adapter merged into base weights loaded in 16/32-bit (never into 4-bit ones), saved with its tokenizer."""
    model_config = resolve_model_config(context, config, registry)
    quantized_dir = storage.local_path(quantized_base)
    quantized = is_quantized_dir(quantized_dir)
    weights = merge_weights_kind(model_config.merge.base_weights, quantized)
    weights_dir = quantized_dir if weights == "dequantized" else original_weights_dir(
        quantized_dir, hub, model_config.trust_remote_code
    )
    dtype = model_config.merge.dtype if model_config.merge.dtype != "auto" else source_dtype(quantized_dir)
    probe = _probe_examples(pd.read_parquet(storage.local_path(formatted_dataset) / "eval.parquet").head(PROBE_EXAMPLES))
    with storage.staging_dir() as staging:
        fidelity = merge_to_dir(
            weights_dir,
            dequantize=quantized and weights == "dequantized",
            adapter_dir=storage.local_path(trained_adapter),
            probe_frame=probe,
            out_dir=staging,
            dtype=dtype,
            trust_remote_code=model_config.trust_remote_code,
        )
        record = stage_lineage(context, model_config, storage, {"formatted_dataset": formatted_dataset,
                            "quantized_base": quantized_base, "trained_adapter": trained_adapter},
                            merged_into=weights, dtype=dtype)
        (staging / "README.md").write_text(merged_card(model_config, record, weights, dtype, fidelity),
                                           encoding="utf-8")
        ref = publish_stage(context, storage, staging, record)
    context.log.info(
        f"merged into {weights} weights; max relative logit difference vs adapter "
        f"{fidelity.max_relative_logit_difference:.2e}"
    )
    return stage_output(
        ref, record, model_config,
        {
            "merged_into": weights,
            "dtype": dtype,
            "merge_fidelity_max_relative_logit_difference": fidelity.max_relative_logit_difference,
            "merge_fidelity_max_absolute_logit_difference": fidelity.max_absolute_logit_difference,
            "probe_tokens": fidelity.probe_tokens,
        },
    )


def _probe_examples(held_out: pd.DataFrame) -> pd.DataFrame:
    """Held-out examples as input_ids and loss_mask: preference pairs as their prompt and chosen answer."""
    if "input_ids" in held_out.columns:
        return held_out
    answers = held_out["chosen_ids" if "chosen_ids" in held_out.columns else "completion_ids"]
    return pd.DataFrame({
        "input_ids": [list(prompt) + list(answer) for prompt, answer in zip(held_out["prompt_ids"], answers)],
        "loss_mask": [[0] * len(prompt) + [1] * len(answer) for prompt, answer in zip(held_out["prompt_ids"], answers)],
    })
