"""Data stages: the rows as loaded, and the cleaned, templated, tokenized train/eval splits; their checks."""

import time
import warnings
from dataclasses import asdict
from concurrent.futures import Future, ThreadPoolExecutor

import dagster as dg
import pandas as pd

from lora_pipeline.assets.common import (
    BASE_MODEL_FIELDS,
    DATA_FIRST,
    MODEL_PARTITIONS,
    Reads,
    pipeline_asset,
    stage_lineage,
    publish_stage,
    read_json,
    resolve_model_config,
    stage_output,
    write_json,
)
from lora_pipeline.config.schema import ModelConfig, TuningRunConfig
from lora_pipeline.ml.data.clean import CleanedRows, clean_rows, tokenizer_corpus
from lora_pipeline.ml.data.formatted import FormatSettings, format_dataset, lost_to_max_length
from lora_pipeline.assets.starting import model_source_version
from lora_pipeline.ml.data.raw import (
    DATASET_INFO,
    LoadedDataset,
    load_dataset,
    release_unused_memory,
    rows_in_folder,
    write_rows,
)
from lora_pipeline.ml.data.formats import storable, validate_rows
from lora_pipeline.ml.report.plots import length_histogram_png, markdown_image
from lora_pipeline.ml.data.quality import CheckOutcome, LengthAdvice, check_disjoint, check_formatted, split_summary
from lora_pipeline.assets.mixture_data import (
    MIXING_ONLY,
    SOURCES_DIR,
    formatted_mixture,
    mixture_metadata,
    mixture_lines,
    mixture_names,
    raw_mixture,
)
from lora_pipeline.assets.preference.data import formatted_preferences, require_objective_fits
from lora_pipeline.assets.starting import starting_adapter
from lora_pipeline.ml.preference.formats import PREFERENCE_FORMATS
from lora_pipeline.ml.preference.formatted import check_preferences
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

FORMAT_SUMMARY = "format_summary.json"
# The dataset fields that say which rows are read (the rest say what is done with them).
# turn_flag_field: which per-turn field the raw rows' flags are checked in.
SOURCE_FIELDS = ("source", "format", "columns", "split", "subset", "revision", "max_rows", "turn_flag_field",
                 "sources")


@pipeline_asset(
    kinds={"parquet", "pandera"}, group="data", code_version="1",
    reads=Reads(config=tuple(f"dataset.{name}" for name in SOURCE_FIELDS), ignoring=MIXING_ONLY, source=True),
)
def raw_dataset(
    context: dg.AssetExecutionContext, config: TuningRunConfig, registry: ModelRegistry, storage: ArtifactStore
) -> dg.Output[ArtifactRef]:
    """Rows of the configured source (file, folder, glob, URL or hub dataset), checked against their format with pandera, stored as Parquet; with dataset.sources, each source's rows on their own, a source unchanged since an earlier run reused rather than read again."""
    model_config = resolve_model_config(context, config, registry)
    source_version = model_source_version(model_config, storage)  # before reading: a change after is seen next time
    if model_config.dataset.sources:
        return raw_mixture(context, model_config, storage, source_version)
    loaded = load_dataset(model_config.dataset)
    with storage.staging_dir() as staging:
        info = write_rows(loaded, staging, model_config.dataset.turn_flag_field)
        content_hash = info["fingerprint"]
        record = stage_lineage(context, model_config, storage, {}, source_version=source_version,
                            dataset_fingerprint=content_hash, rows=info["rows"])
        ref = publish_stage(context, storage, staging, record)
    context.log.info(f"{info['rows']} {loaded.format} rows from {loaded.source}"
                     + (" (format detected)" if loaded.detected else ""))
    preview = _preview(storable(loaded.frame.head(5))[0])
    del loaded
    release_unused_memory()
    return stage_output(
        ref, record, model_config,
        {
            "source": info["source"],
            "source_kind": info["source_kind"],
            "source_files": len(info["files"]),
            "format": info["format"],
            "format_detected": info["format_detected"],
            "fingerprint": content_hash,
            "rows": info["rows"],
            "columns": ", ".join(map(str, info["columns"])),
            "preview": dg.MetadataValue.md(preview),
        },
    )


def stored_rows(storage: ArtifactStore, ref: ArtifactRef) -> LoadedDataset:
    """The raw_dataset artifact as loaded rows again (nested values stay JSON text; the format readers parse it)."""
    return rows_in_folder(storage.local_path(ref))


def stored_sources(storage: ArtifactStore, ref: ArtifactRef) -> dict[str | None, LoadedDataset]:
    """The raw_dataset artifact's rows per source: {name: rows} of a mixture, {None: rows} of one source."""
    folder = storage.local_path(ref)
    names = mixture_names(folder)
    return {None: rows_in_folder(folder)} if names is None else {
        name: rows_in_folder(folder / SOURCES_DIR / name) for name in names}


def format_settings(model_config: ModelConfig) -> FormatSettings:
    """The parts of the config that decide how rows become training examples."""
    dataset, training = model_config.dataset, model_config.training
    return FormatSettings(
        template=dataset.template,
        system_prompt=dataset.system_prompt,
        max_length=training.max_length,
        overlong=dataset.overlong,
        eval_fraction=dataset.eval_fraction,
        loss_on_responses_only=training.completion_only_loss,
        turn_flag_field=dataset.turn_flag_field,
        turns=dataset.turns,
        reasoning=dataset.reasoning,
        unrenderable=dataset.unrenderable,
        max_unrenderable_rate=dataset.max_unrenderable_rate,
    )


@pipeline_asset(
    kinds={"parquet", "pandera"}, group="data", code_version="2",
    # Not training.objective: DPO, KTO and ORPO train on the same formatted pairs (trained_adapter checks the fit).
    reads=Reads(config=("dataset", *BASE_MODEL_FIELDS, "training.max_length", "training.completion_only_loss",
                        "training.init_adapter")),
)
def formatted_dataset(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    hub: ModelHub,
    raw_dataset: ArtifactRef,
) -> dg.Output[ArtifactRef]:
    """Training examples: empty rows and duplicates dropped, the template applied with one EOS, tokenized with the base's tokenizer, over-long ones truncated, dropped or split into blocks (plain text), split train/eval by content hash; with dataset.sources, each source so on its own, then its training rows sampled or repeated by its weight and the sources interleaved into one pair of splits with a source column (the sources table shows each one's rows and tokens before and after mixing)."""
    model_config = resolve_model_config(context, config, registry)
    raw_info = read_json(storage.local_path(raw_dataset) / DATASET_INFO)
    if "format" in raw_info:  # one source (a mixture's sources were checked to fit SFT when read)
        require_objective_fits(model_config, raw_info["format"], model_config.dataset.source)
        if raw_info["format"] in PREFERENCE_FORMATS:
            start = starting_adapter(storage, model_config, context.partition_key)
            return formatted_preferences(context, model_config, storage, hub, raw_dataset,
                                         stored_rows(storage, raw_dataset), start, FORMAT_SUMMARY)
    settings = format_settings(model_config)
    with storage.staging_dir() as staging:
        formatted, timings = _formatted_rows(context, model_config, settings, storage, hub, raw_dataset, staging)
        counts = formatted.counts
        advice = LengthAdvice.of(formatted.token_lengths, settings.max_length)
        mixture = {} if formatted.sources is None else {"sources": formatted.sources,
                                                        "mix_seed": model_config.dataset.mix_seed}
        write_json(
            staging / FORMAT_SUMMARY,
            {"format": formatted.format, "template": formatted.template, "eos_token": formatted.eos_token,
             "pad_token": formatted.pad_token, "counts": counts, "max_length": settings.max_length,
             "overlong": formatted.overlong, "max_truncation_rate": model_config.dataset.max_truncation_rate,
             "length_advice": asdict(advice), **mixture},
        )
        record = stage_lineage(context, model_config, storage, {"raw_dataset": raw_dataset},
                            train_rows=counts["train_rows"], eval_rows=counts["eval_rows"])
        ref = publish_stage(context, storage, staging, record)
    context.log.info(_rows_per_step_line(counts))
    context.log.info(timings)
    for line in mixture_lines(formatted.sources or []):
        context.log.info(line)
    lengths = formatted.token_lengths
    release_unused_memory()
    return stage_output(
        ref, record, model_config,
        {
            "format": formatted.format,
            "template": formatted.template,
            "eos_token": formatted.eos_token,
            "pad_token": str(formatted.pad_token),
            "rows_in": counts["rows_in"],
            **{f"dropped_{name}": counts[name]
               for name in ("empty", "exact_duplicates", "normalized_duplicates", "too_long_dropped",
                            "no_trainable_tokens", "unrenderable_dropped")},
            # How conversations met the template (dataset.turns) and what one example per turn cost.
            "turns": settings.turns,
            "per_turn_rows": counts["per_turn_rows"],
            "per_turn_examples": counts["per_turn_examples"],
            "per_turn_extra_tokens": counts["per_turn_extra_tokens"],
            "overlong": formatted.overlong,
            "truncated": counts["truncated"],
            "split_documents": counts["split_documents"],
            "tokens_lost_to_max_length": counts["tokens_lost_to_max_length"],
            "max_length_keeping_95%": advice.keeps_95,
            "max_length_keeping_99%": advice.keeps_99,
            "train_rows": counts["train_rows"],
            "eval_rows": counts["eval_rows"],
            "rows_per_step": dg.MetadataValue.md(_rows_per_step_table(counts)),
            "train_tokens": counts["train_tokens"],
            "max_tokens": int(lengths.max()),
            # Split documents lose nothing: only truncating or dropping makes a rate of loss.
            "truncation_rate": (formatted.truncation_rate if formatted.truncation_rate is not None
                                else 0.0 if formatted.overlong == "split"
                                else float((lengths > settings.max_length).mean())),
            "token_lengths": dg.MetadataValue.md(
                markdown_image(length_histogram_png(lengths, settings.max_length), "token lengths")
            ),
            "preview": dg.MetadataValue.md(_preview(formatted.preview)),
            **({} if formatted.sources is None else mixture_metadata(formatted.sources, model_config.dataset.mix_seed)),
        },
    )


def _formatted_rows(context: dg.AssetExecutionContext, model_config: ModelConfig, settings: FormatSettings,
                    storage: ArtifactStore, hub: ModelHub, raw_dataset: ArtifactRef, staging) -> tuple[object, str]:
    """The formatted splits written into staging (one source's, or a mixture's), and how long each part took."""
    started = time.perf_counter()
    if mixture_names(storage.local_path(raw_dataset)) is not None:
        formatted = formatted_mixture(model_config, settings, storage, hub, raw_dataset, staging, context.log.info)
        return formatted, (f"read, cleaned, formatted and mixed {len(formatted.sources)} sources "
                           f"({formatted.counts['rows_in']:,} rows) in {time.perf_counter() - started:.2f}s")
    cleaned, tokenizer, cleaned_at = _cleaned_rows_and_tokenizer(model_config, settings, storage, hub, raw_dataset)
    tokenizer_at = time.perf_counter()
    formatted = format_dataset(cleaned, tokenizer, settings, progress=context.log.info, folder=staging)
    counts = formatted.counts
    return formatted, (
        f"read and cleaned {counts['rows_in']:,} rows in {cleaned_at - started:.2f}s, then waited "
        f"{tokenizer_at - cleaned_at:.2f}s for the tokenizer; formatted {counts['rows_after_cleaning']:,} rows "
        f"in {time.perf_counter() - tokenizer_at:.2f}s"
    )


def _cleaned_rows_and_tokenizer(model_config: ModelConfig, settings: FormatSettings, storage: ArtifactStore,
                                hub: ModelHub, raw_dataset: ArtifactRef) -> tuple[CleanedRows, object, float]:
    """The cleaned rows, the base's tokenizer, and when the rows were cleaned.

    Loading the tokenizer imports transformers' tokenizer classes, and the first time a folder is seen,
    torch too, to choose the class (ml/base/tokenizer.py): a second or more of Python. Reading and
    cleaning the rows is mostly Arrow work that releases the GIL, so the two run side by side. A
    built-in base trains its tokenizer on the cleaned rows, so its loading waits for them.
    """
    cleaned_rows: Future = Future()

    def load_tokenizer():
        return hub.tokenizer(model_config.base_model, model_config.base_revision,
                             lambda: tokenizer_corpus(cleaned_rows.result(), settings.eval_fraction),
                             trust_remote_code=model_config.trust_remote_code)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-tokenizer") as pool:
        tokenizer = pool.submit(load_tokenizer)
        try:
            cleaned = clean_rows(stored_rows(storage, raw_dataset), model_config.dataset.dedupe)
        except BaseException as exc:
            cleaned_rows.set_exception(exc)  # a built-in base's loading stops waiting for the rows
            raise
        cleaned_rows.set_result(cleaned)
        cleaned_at = time.perf_counter()
        return cleaned, tokenizer.result(), cleaned_at


def data_check(asset: dg.AssetsDefinition):
    """A blocking check of one model's data (partitioned like its asset), run before the model stages."""

    def decorate(check):
        with warnings.catch_warnings():
            # Partitioned asset checks are marked preview in dagster 1.13; they are the right model here.
            warnings.filterwarnings("ignore", category=dg.PreviewWarning)
            return dg.asset_check(asset=asset, blocking=True, op_tags=DATA_FIRST, partitions_def=MODEL_PARTITIONS)(check)

    return decorate


@data_check(raw_dataset)
def rows_match_format(context: dg.AssetCheckExecutionContext, storage: ArtifactStore,
                      raw_dataset: ArtifactRef) -> dg.AssetCheckResult:
    """The stored rows pass the pandera schema of their format (required columns, types, roles, turns); a mixture's, each source's rows the schema of its own format."""
    folder = storage.local_path(raw_dataset)
    checked = {}
    for name, loaded in stored_sources(storage, raw_dataset).items():
        info = read_json(folder / DATASET_INFO if name is None else folder / SOURCES_DIR / name / DATASET_INFO)
        validate_rows(loaded.frame, loaded.format, loaded.rows.where, loaded.source, info.get("turn_flag_field"))
        checked[name] = (loaded.format, len(loaded.frame))
    if None in checked:
        fmt, rows = checked[None]
        return dg.AssetCheckResult(passed=True, description=f"{rows} rows match the {fmt} schema",
                                   metadata={"format": fmt, "rows": rows})
    return dg.AssetCheckResult(
        passed=True,
        description="; ".join(f"{name}: {rows} rows match the {fmt} schema" for name, (fmt, rows) in checked.items()),
        metadata={"rows": sum(rows for _, rows in checked.values()),
                  **{f"{name}_format": fmt for name, (fmt, _) in checked.items()}},
    )


@data_check(formatted_dataset)
def examples_are_trainable(context: dg.AssetCheckExecutionContext, storage: ArtifactStore,
                           formatted_dataset: ArtifactRef) -> dg.AssetCheckResult:
    """Each example has text, tokens, at least one trained token and ends with one EOS unless truncated or continued in the next block; the share of examples over max_length is within dataset.max_truncation_rate (a failure names the max_length that keeps 95% and 99% whole)."""
    folder = storage.local_path(formatted_dataset)
    summary = read_json(folder / FORMAT_SUMMARY)
    if summary["format"] in PREFERENCE_FORMATS:
        return _check_result(check_preferences(
            summary["format"], pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "eval.parquet"),
            summary.get("eos_token_id"), summary["max_truncation_rate"], LengthAdvice(**summary["length_advice"])))
    outcome = check_formatted(
        split_summary(folder / "train.parquet"),
        split_summary(folder / "eval.parquet"),
        summary["max_truncation_rate"],
        lost_to_max_length(summary["counts"]),
        # Datasets formatted before these were recorded are checked as before.
        LengthAdvice(**summary["length_advice"]) if "length_advice" in summary else None,
        summary["counts"].get("tokens_lost_to_max_length"),
    )
    return _check_result(outcome)


@data_check(formatted_dataset)
def train_eval_disjoint(context: dg.AssetCheckExecutionContext, storage: ArtifactStore,
                        formatted_dataset: ArtifactRef) -> dg.AssetCheckResult:
    """No example (compared case- and whitespace-insensitively) is in both the training and the held-out split."""
    folder = storage.local_path(formatted_dataset)
    columns = ["content_hash"]
    outcome = check_disjoint(pd.read_parquet(folder / "train.parquet", columns=columns),
                             pd.read_parquet(folder / "eval.parquet", columns=columns))
    return _check_result(outcome)


CHECKS = [rows_match_format, examples_are_trainable, train_eval_disjoint]


def _check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=outcome.passed, description=outcome.description, metadata=outcome.figures)


STEP_LABELS = {
    "rows_in": "rows read",
    "empty": "empty (dropped)",
    "exact_duplicates": "exact duplicates (dropped)",
    "normalized_duplicates": "case/whitespace duplicates (dropped)",
    "unrenderable_dropped": "the template cannot render them (dropped)",
    "per_turn_rows": "conversations trained one example per learned turn",
    "per_turn_examples": "examples those give",
    "too_long_dropped": "longer than max_length (dropped)",
    "no_trainable_tokens": "no response tokens within max_length (dropped)",
    "responses_beyond_max_length": "of those, over max_length with the whole response beyond it",
    "truncated": "truncated to max_length (kept)",
    "split_documents": "split into max_length blocks (kept)",
    "blocks_added": "blocks added by splitting",
    "train_rows": "train",
    "eval_rows": "eval",
}


def _rows_per_step_table(counts: dict) -> str:
    frame = pd.DataFrame({"step": [STEP_LABELS[k] for k in STEP_LABELS], "rows": [counts[k] for k in STEP_LABELS]})
    return frame.to_markdown(index=False)


def _rows_per_step_line(counts: dict) -> str:
    dropped = {k: counts[k] for k in ("empty", "exact_duplicates", "normalized_duplicates", "unrenderable_dropped",
                                      "too_long_dropped", "no_trainable_tokens") if counts[k]}
    dropped_text = ", ".join(f"{v} {STEP_LABELS[k].split(' (')[0]}" for k, v in dropped.items()) or "none"
    split = (f"; split: {counts['split_documents']} documents into {counts['blocks_added']} more blocks"
             if counts["split_documents"] else "")
    if counts["per_turn_rows"]:
        split += (f"; {counts['per_turn_rows']} conversations as {counts['per_turn_examples']} per-turn examples "
                  f"(+{counts['per_turn_extra_tokens']:,} tokens)")
    return (f"{counts['rows_in']} rows -> {counts['train_rows']} train + {counts['eval_rows']} eval; dropped: "
            f"{dropped_text}; truncated: {counts['truncated']}{split}")


def _preview(frame: pd.DataFrame, rows: int = 5) -> str:
    shortened = frame.head(rows).map(lambda value: (str(value)[:80] + "…") if len(str(value)) > 80 else str(value))
    return shortened.replace({"\n": " "}, regex=True).to_markdown(index=False)
