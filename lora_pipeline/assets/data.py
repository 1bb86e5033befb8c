"""Data stages: the rows as loaded, and the formatted train/eval splits."""

import dagster as dg
import pandas as pd

from lora_pipeline.assets.common import (
    config_metadata,
    pipeline_asset,
    ref_metadata,
    resolve_model_config,
)
from lora_pipeline.config.schema import TuningRunConfig
from lora_pipeline.ml.data import fingerprint, format_alpaca, load_alpaca, training_texts
from lora_pipeline.ml.plots import bar_chart_png, markdown_image
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore


@pipeline_asset(kinds={"parquet"}, group="data")
def raw_dataset(
    context: dg.AssetExecutionContext, config: TuningRunConfig, registry: ModelRegistry, storage: ArtifactStore
) -> dg.Output[ArtifactRef]:
    """Rows of the configured dataset source, checked against the declared format, stored as Parquet."""
    model_config = resolve_model_config(context, config, registry)
    frame = load_alpaca(model_config.dataset.source, model_config.dataset.max_rows)
    content_hash = fingerprint(frame)
    with storage.staging_dir() as staging:
        frame.to_parquet(staging / "rows.parquet", index=False)
        ref = storage.publish(staging, context.partition_key, "raw_dataset")
    return dg.Output(
        ref,
        data_version=dg.DataVersion(content_hash[:16]),
        metadata={
            **ref_metadata(ref),
            **config_metadata(model_config),
            "source": dg.MetadataValue.text(model_config.dataset.source),
            "format": dg.MetadataValue.text(model_config.dataset.format),
            "fingerprint": dg.MetadataValue.text(content_hash),
            "rows": dg.MetadataValue.int(len(frame)),
            "columns": dg.MetadataValue.text(", ".join(frame.columns)),
            "preview": dg.MetadataValue.md(_preview(frame)),
        },
    )


@pipeline_asset(kinds={"parquet"}, group="data")
def formatted_dataset(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    hub: ModelHub,
    raw_dataset: ArtifactRef,
) -> dg.Output[ArtifactRef]:
    """Training examples after the prompt template, with EOS appended once, split train/eval by content hash."""
    from transformers import AutoTokenizer

    model_config = resolve_model_config(context, config, registry)
    rows = pd.read_parquet(storage.local_path(raw_dataset) / "rows.parquet").astype("string")
    eval_fraction = model_config.dataset.eval_fraction
    tokenizer_dir = hub.resolve(
        model_config.base_model,
        model_config.base_revision,
        lambda: training_texts(rows, eval_fraction),
        tokenizer_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    splits = format_alpaca(rows, tokenizer.eos_token, eval_fraction, model_config.dataset.source)
    lengths = [len(ids) for ids in tokenizer(list(splits.train["text"]))["input_ids"]]
    max_length = model_config.training.max_length
    truncated = sum(length > max_length for length in lengths)
    with storage.staging_dir() as staging:
        splits.train.to_parquet(staging / "train.parquet", index=False)
        splits.eval.to_parquet(staging / "eval.parquet", index=False)
        ref = storage.publish(staging, context.partition_key, "formatted_dataset")
    return dg.Output(
        ref,
        metadata={
            **ref_metadata(ref),
            **config_metadata(model_config),
            "template": dg.MetadataValue.text(splits.template),
            "eos_token": dg.MetadataValue.text(tokenizer.eos_token),
            "rows_in": dg.MetadataValue.int(len(rows)),
            "train_rows": dg.MetadataValue.int(len(splits.train)),
            "eval_rows": dg.MetadataValue.int(len(splits.eval)),
            "train_tokens": dg.MetadataValue.int(sum(lengths)),
            "max_tokens": dg.MetadataValue.int(max(lengths)),
            "truncation_rate": dg.MetadataValue.float(truncated / len(lengths)),
            "token_lengths": dg.MetadataValue.md(markdown_image(_length_histogram(lengths), "token lengths")),
            "preview": dg.MetadataValue.md(_preview(splits.train[["prompt", "completion"]])),
        },
    )


def _preview(frame: pd.DataFrame, rows: int = 5) -> str:
    shortened = frame.head(rows).map(lambda value: (str(value)[:80] + "…") if len(str(value)) > 80 else str(value))
    return shortened.replace({"\n": " "}, regex=True).to_markdown(index=False)


def _length_histogram(lengths: list[int]) -> bytes:
    edges = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    counts: dict[str, float] = {}
    for low, high in zip(edges, edges[1:]):
        counts[f"{low}-{high}"] = sum(low < length <= high for length in lengths)
    counts[f">{edges[-1]}"] = sum(length > edges[-1] for length in lengths)
    return bar_chart_png({k: v for k, v in counts.items() if v}, "examples", "tokens per training example")
