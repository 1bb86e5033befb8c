"""`lora-pipeline validate`: a config, its data and its memory plan checked, without loading any model."""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from lora_pipeline.cli.session import check_data_early
from lora_pipeline.config.registry import load_config_file, load_sweep_file, partition_key_for


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    """Declare `validate` and its arguments."""
    parser = commands.add_parser(
        "validate", parents=parents,
        help="check a config and its data without loading any model",
        description="Validate CONFIG against the schema and read and check its dataset; no model is loaded.",
    )
    parser.add_argument("config", type=Path, help="model config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def do_cli(args: argparse.Namespace) -> int:
    """Validate and print the summary (text or JSON); a sweep file: every variant, one summary each."""
    variants = load_sweep_file(args.config, args.overrides)
    if variants is not None:
        summaries = []
        for key, model_config in variants.items():
            summary, cleaned, memory_lines = do_validate(model_config, key)
            summaries.append(summary)
            if not args.json:
                print_summary(args.config, model_config, summary, cleaned, memory_lines)
        if args.json:
            print(json.dumps({"sweep": partition_key_for(args.config), "variants": summaries}))
        return 0
    model_config = load_config_file(args.config, args.overrides)
    summary, cleaned, memory_lines = do_validate(model_config, partition_key_for(args.config))
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(args.config, model_config, summary, cleaned, memory_lines)
    return 0


def do_validate(model_config, key: str) -> tuple[dict, object, list[str]]:
    """The validation summary of a config, its cleaned rows (None for a remote source, read when raw_dataset
    runs) and the memory plan's lines to print."""
    source = model_config.dataset.source
    cleaned, (train_rows, eval_rows) = check_data_early(model_config) if is_local_source(source) else (None, (None, None))
    mode = model_config.quantization.mode
    summary = {
        "partition": key,
        "config_hash": model_config.canonical_hash(),
        "base_model": model_config.base_model,
        "builtin_base": model_config.builtin_base,
        "method": "QLoRA" if mode in ("nf4", "fp4") else ("LoRA on int8" if mode == "int8" else "LoRA"),
        "dataset": source,
        "format": cleaned.loaded.format if cleaned else None,
        "format_detected": cleaned.loaded.detected if cleaned else None,
        "cleaning": cleaned.counts if cleaned else None,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
    }
    summary["memory_plan"], memory_lines = memory_summary(model_config)
    return summary, cleaned, memory_lines


def print_summary(path: Path, model_config, summary: dict, cleaned, memory_lines: list[str]) -> None:
    """The validation summary for a person."""
    source = summary["dataset"]
    print(f"{path}: valid (model {summary['partition']}, config {summary['config_hash'][:12]})")
    print(f"  base model  {summary['base_model']} ({summary['method']}, quantization {model_config.quantization.mode})")
    if cleaned is not None:
        counts = cleaned.counts
        detected = " (detected)" if cleaned.loaded.detected else ""
        print(f"  dataset     {source}: {counts['rows_in']} {cleaned.loaded.format}{detected} rows -> "
              f"{summary['train_rows']} training, {summary['eval_rows']} held-out")
        dropped = counts["empty"] + counts["exact_duplicates"] + counts["normalized_duplicates"]
        if dropped:
            print(f"              dropped {counts['empty']} empty, {counts['exact_duplicates']} exact and "
                  f"{counts['normalized_duplicates']} case/whitespace duplicates (token lengths are "
                  "checked when formatted_dataset runs)")
    else:
        print(f"  dataset     {source}: remote, read when raw_dataset runs")
    print("\n".join(memory_lines))


def is_local_source(source: str) -> bool:
    """Whether the source is on this machine (validate reads only those; remote ones are read by raw_dataset)."""
    local = source.removeprefix("file://")
    return "://" not in local and not local.startswith("hf:") and (Path(local).exists() or bool(glob.glob(local)))


def memory_summary(model_config) -> tuple[dict | None, list[str]]:
    """The training's memory plan on this machine's device, as JSON and as lines to print."""
    from lora_pipeline.ml.base.fit import assess_fit
    from lora_pipeline.ml.base.precision import detect_device

    assessment = assess_fit(model_config, detect_device())  # a local base_model folder's config.json is read as is
    if assessment is None:
        return None, ["  memory      unknown here: the base model's config.json is not shipped or local"]
    lines = ["  " + line for line in assessment.plan.render().splitlines()]
    lines.append(f"  {'fits' if assessment.fits else 'does NOT fit'} in {assessment.where()}")
    lines += [f"    {knob}" for knob in assessment.knobs[:4]]
    return assessment.summary(), lines
