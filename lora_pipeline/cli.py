"""`lora-pipeline`: run, validate and list model configs from the terminal.

Runs execute in-process on the persistent Dagster instance ($DAGSTER_HOME, default .dagster/ in
the working directory), so they show up in `make ui` like runs launched there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from lora_pipeline.errors import ConfigError, DataError, LoraPipelineError

ASSET_ORDER = ["raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report"]
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1

EPILOG = """\
examples:
  lora-pipeline run configs/tiny-demo.yaml
  lora-pipeline run configs/tiny-demo.yaml --select +trained_adapter --set lora.r=8
  lora-pipeline run my-model.yaml --storage s3://bucket/lora --json
  lora-pipeline run configs/tiny-demo.yaml --select raw_dataset,formatted_dataset --set dataset.source=chats.jsonl
  lora-pipeline validate configs/llama-3.1-8b-qlora.yaml
  lora-pipeline list

selection (--select): comma-separated parts. A plain asset name selects it; '+name' adds
everything it depends on, 'name+' everything that depends on it (as Dagster's '+key:name' and
'key:name+'). Any other part is Dagster's selection syntax, e.g. 'key:merged_model or
key:eval_report', '1+key:eval_report' (one level up).
assets: raw_dataset, formatted_dataset, quantized_base, trained_adapter, merged_model, eval_report.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-pipeline",
        description="Fine-tune language models with LoRA/QLoRA as Dagster assets: "
        "raw_dataset -> formatted_dataset -> quantized_base -> trained_adapter -> merged_model -> eval_report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="materialize the pipeline for one model config",
        description="Materialize the selected assets (all six by default) for the model in CONFIG. "
        "The partition key is CONFIG's file name without .yaml. Assets whose newest artifact was made "
        "from the same code, libraries, config and data are up to date and skipped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", type=Path, help="model config YAML (in configs/ or anywhere)")
    run.add_argument("--select", default="*", metavar="SELECTION", help="assets to materialize (default: all)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.max_steps=20 (repeatable; values parsed as YAML)",
    )
    run.add_argument(
        "--storage", metavar="URI",
        help="artifact store root: a folder or s3://bucket/prefix (default: $LORA_PIPELINE_STORAGE or ./artifacts)",
    )
    run.add_argument("--json", action="store_true", help="print a machine-readable summary as the last stdout line")
    run.add_argument("--force", action="store_true",
                     help="run the selected assets even when they are up to date (an adapter already trained "
                     "from the same inputs is still reused; change training.seed to train another)")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    validate = commands.add_parser(
        "validate",
        help="check a config and its data without loading any model",
        description="Validate CONFIG against the schema and read and check its dataset; no model is loaded.",
    )
    validate.add_argument("config", type=Path, help="model config YAML")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key (repeatable)")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    listing = commands.add_parser(
        "list",
        help="list the configured models and the state of their assets",
        description="List the model configs in the config folder and models run from elsewhere, with "
        "when each asset was last materialized and which are stale: made from other settings, data, libraries "
        "or code than the config file's now, so `lora-pipeline run` would redo them.",
    )
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # On CPUs with AVX512-BF16, bitsandbytes warns that it could not fetch an optional 4-bit kernel
    # from the hub (the `kernels` package); its built-in CPU path, the one tested here, is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)


DEFAULT_INSTANCE_YAML = """\
# Written by lora-pipeline on first use; edit freely.
telemetry:
  enabled: false
nux:
  enabled: false
# quantized_base, trained_adapter, merged_model and eval_report run in the `gpu` pool: at most this many
# at once (the number of GPUs found when this file was written; 1 without a GPU).
concurrency:
  pools:
    default_limit: {gpu_limit}
"""


def _instance():
    import fcntl

    import dagster as dg

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    # Two runs launched at once on a fresh home would both create the instance's SQLite schema.
    with (home / ".lora-pipeline-instance.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "dagster.yaml").exists():
            from lora_pipeline.ml.precision import detect_device

            gpu_limit = max(1, detect_device().gpu_count)
            (home / "dagster.yaml").write_text(DEFAULT_INSTANCE_YAML.format(gpu_limit=gpu_limit))
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # creates the run storage's schema while we hold the lock
        return instance


PID_TAG = "lora_pipeline/pid"
HOST_TAG = "lora_pipeline/host"


def _reclaim_dead_runs(instance) -> None:
    """Mark runs of this machine whose process was killed as failed and free their pool slots.

    A run killed with SIGKILL cannot report its end, so it would hold its `gpu` pool slot forever
    and the next run would wait for it; no daemon watches in-process CLI runs.
    """
    import socket

    import dagster as dg

    from lora_pipeline.resources.locks import process_alive

    host = socket.gethostname()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        pid = run.tags.get(PID_TAG)
        if run.tags.get(HOST_TAG) != host or not pid or process_alive(int(pid)):
            continue
        instance.report_run_failed(run, message=f"the lora-pipeline process running it (pid {pid}) is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        print(f"note: run {run.run_id} was killed (pid {pid} is gone); marked failed, its pool slot freed",
              file=sys.stderr)


def _selection(text: str):
    """Parse --select: comma-separated names with dbt-style '+' edges, or Dagster selection strings."""
    import dagster as dg

    selection = None
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\+?)([a-z_]+)(\+?)", part)
        if part == "*":
            piece = dg.AssetSelection.all()
        elif match:
            piece = dg.AssetSelection.assets(match.group(2))
            if match.group(1):
                piece = piece.upstream()
            if match.group(3):
                piece = piece.downstream()
        else:
            try:
                piece = dg.AssetSelection.from_string(part)
            except Exception as exc:  # Dagster's parser raises several types
                raise ConfigError(f"--select {part!r}: {str(exc).splitlines()[0]}") from None
        selection = piece if selection is None else selection | piece
    if selection is None:
        raise ConfigError("--select is empty")
    return selection


def _selected_asset_names(selection) -> list[str]:
    import dagster as dg

    from lora_pipeline.assets import PIPELINE_ASSETS, SETTINGS_SPECS

    try:
        # With the settings assets in the graph, 'key:trained_adapter_settings+' selects what that stage's
        # settings feed; only pipeline assets are run.
        keys = selection.resolve([*PIPELINE_ASSETS, dg.AssetsDefinition(specs=SETTINGS_SPECS)])
    except Exception as exc:  # Dagster raises several types for bad selections
        raise ConfigError(f"--select: {exc}".splitlines()[0]) from None
    names = {key.to_user_string() for key in keys}
    return [name for name in ASSET_ORDER if name in names]


def _check_data_early(model_config):
    """Read, check and clean the dataset before any model is loaded; return the cleaned rows and the split sizes."""
    from lora_pipeline.ml.data import clean_rows, load_dataset, split_sizes

    cleaned = clean_rows(load_dataset(model_config.dataset), model_config.dataset.dedupe)
    return cleaned, split_sizes(cleaned, model_config.dataset.eval_fraction)


def _is_local_source(source: str) -> bool:
    """Whether the source is on this machine (validate reads only those; remote ones are read by raw_dataset)."""
    import glob

    local = source.removeprefix("file://")
    return "://" not in local and not local.startswith("hf:") and (Path(local).exists() or bool(glob.glob(local)))


def _failed_checks(instance, run_id: str) -> list[str]:
    """'asset check: description' for each asset check of the run that did not pass."""
    import dagster as dg

    failures = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.event_specific_data
        if not evaluation.passed:
            failures.append(f"{evaluation.asset_key.path[-1]} check {evaluation.check_name}: {evaluation.description}")
    return failures


def _register_partition(instance, key: str, config_path: Path) -> None:
    from lora_pipeline.assets.common import MODEL_PARTITIONS
    from lora_pipeline.config.registry import ConfigRegistry

    registry = ConfigRegistry()
    if key in registry.keys and registry.path_of(key) != config_path.resolve():
        raise ConfigError(
            f"{config_path}: model key {key!r} is already taken by {registry.path_of(key)}; rename the file"
        )
    if not instance.has_dynamic_partition(MODEL_PARTITIONS.name, key):
        instance.add_dynamic_partitions(MODEL_PARTITIONS.name, [key])


def _user_error_in(exc: BaseException) -> LoraPipelineError | None:
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LoraPipelineError):
            return current
        current = getattr(current, "user_exception", None) or current.__cause__ or current.__context__
    return None


def command_run(args: argparse.Namespace) -> int:
    from lora_pipeline.assets.provenance import readable_source_version
    from lora_pipeline.config.registry import load_config_file, partition_key_for
    from lora_pipeline.resources.factory import default_resources

    model_config = load_config_file(args.config, args.overrides)
    key = partition_key_for(args.config)
    selected = _selected_asset_names(_selection(args.select))
    if not selected:
        raise ConfigError(f"--select {args.select!r} matches no asset")
    instance = _instance()
    _reclaim_dead_runs(instance)
    _register_partition(instance, key, args.config)
    resources = default_resources(storage_root=args.storage)
    started = time.perf_counter()
    source_version = readable_source_version(model_config)  # None if unreadable: raw_dataset will say why
    with _settings_reported(instance, key, model_config, source_version, args):
        return _run_stale_assets(args, instance, key, selected, model_config, source_version, resources, started)


@contextlib.contextmanager
def _settings_reported(instance, key: str, model_config, source_version: str | None, args: argparse.Namespace):
    """Report the settings the run uses before it, and after a run with --set, the config file's again.

    Reported before, so that the run's materializations record them as their inputs' versions and
    a later edit of the file shows as stale in the UI. A run with --set made its assets from other
    settings than the file's; reporting the file's afterwards marks them stale in the UI, as the
    model_configs sensor, schedules and a plain `lora-pipeline run` see them.
    """
    from lora_pipeline.assets.provenance import readable_source_version
    from lora_pipeline.assets.settings import report_settings
    from lora_pipeline.config.registry import load_config_file

    report_settings(instance, key, model_config, source_version)
    try:
        yield
    finally:
        file_config = None
        if args.overrides:
            try:
                file_config = load_config_file(args.config)
            except ConfigError:
                pass  # the file alone is not a valid config: it has no settings of its own to show
        if file_config is not None:
            same_source = file_config.dataset == model_config.dataset
            report_settings(instance, key, file_config,
                            source_version if same_source else readable_source_version(file_config))


def _run_stale_assets(args: argparse.Namespace, instance, key: str, selected: list[str], model_config,
                      source_version: str | None, resources: dict, started: float) -> int:
    """Run the selected assets that are not up to date (all with --force) and print the summary."""
    import socket

    import dagster as dg

    from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS, SETTINGS_SPECS
    from lora_pipeline.assets.provenance import plain_metadata, up_to_date_assets
    from lora_pipeline.definitions import tune
    from lora_pipeline.terminal import terminal_logger

    current = {} if args.force else up_to_date_assets(instance, key, selected, model_config, resources["storage"],
                                                       source_version)
    to_run = [name for name in selected if name not in current]
    if current:
        print(f"up to date, not run: {', '.join(current)}", file=sys.stderr)
    if not to_run:
        assets = {name: current[name] for name in selected}
        _print_run_summary(key, None, assets, time.perf_counter() - started, sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps({"partition": key, "run_id": None, "wall_seconds": round(time.perf_counter() - started, 2),
                              "assets": assets, "up_to_date": list(current)}))
        return 0
    if "trained_adapter" in to_run:
        from lora_pipeline.ml.fit import check_fits

        check_fits(model_config, resources["compute"].info())
    if "raw_dataset" in to_run:
        _check_data_early(model_config)
        from lora_pipeline.ml.data import release_unused_memory

        release_unused_memory()
    config_data = model_config.model_dump(mode="json")
    run_config = {
        "ops": {name: {"config": config_data} for name in to_run},
        "loggers": {"console": {"config": {"log_level": "DEBUG" if args.debug else "INFO", "tracebacks": args.debug}}},
    }
    definitions = dg.Definitions(
        assets=[*PIPELINE_ASSETS, *SETTINGS_SPECS],
        asset_checks=PIPELINE_CHECKS,
        jobs=[tune],
        resources=resources,
        loggers={"console": terminal_logger},
    )
    try:
        result = definitions.resolve_job_def(tune.name).execute_in_process(
            asset_selection=[dg.AssetKey(name) for name in to_run],
            partition_key=key,
            run_config=run_config,
            instance=instance,
            tags={"lora_pipeline/config": str(args.config), PID_TAG: str(os.getpid()),
                  HOST_TAG: socket.gethostname()},
        )
    except Exception:
        latest = instance.get_runs(limit=1)
        failed_checks = _failed_checks(instance, latest[0].run_id) if latest else []
        if failed_checks:
            raise DataError("; ".join(failed_checks) + f" (run {latest[0].run_id}; later assets were not built)") from None
        raise
    wall = time.perf_counter() - started
    assets = {}
    for name in selected:
        if name in current:
            assets[name] = current[name]
        for event in result.asset_materializations_for_node(name):
            metadata = plain_metadata(event.metadata)
            assets[name] = {"uri": metadata.get("uri"), "metadata": metadata}
    _print_run_summary(key, result.run_id, assets, wall, sys.stderr if args.json else sys.stdout, set(current))
    if args.json:
        print(json.dumps({"partition": key, "run_id": result.run_id, "wall_seconds": round(wall, 2), "assets": assets,
                          "up_to_date": list(current)}))
    return 0


def _print_run_summary(key: str, run_id: str | None, assets: dict, wall: float, stream,
                       up_to_date: set[str] = frozenset()) -> None:
    ran = f"run {run_id} finished" if run_id else "everything up to date, nothing run,"
    print(f"\nmodel {key}: {ran} in {wall:.0f}s", file=stream)
    for name, entry in assets.items():
        print(f"  {name:<18} {entry['uri']}{'  (up to date)' if name in up_to_date else ''}", file=stream)
    report = assets.get("eval_report")
    if report:
        meta = report["metadata"]
        print(
            f"\nheld-out loss: base {meta.get('base_loss', float('nan')):.4f}, adapter "
            f"{meta.get('adapter_loss', float('nan')):.4f} ({meta.get('adapter_vs_base_loss_change', 0):+.1%}), "
            f"merged {meta.get('merged_loss', float('nan')):.4f}",
            file=stream,
        )
        print(f"report: {Path(report['uri']) / 'report.md'}", file=stream)


def _memory_summary(model_config) -> tuple[dict | None, list[str]]:
    """The training's memory plan on this machine's device, as JSON and as lines to print."""
    from lora_pipeline.ml.fit import assess_fit
    from lora_pipeline.ml.precision import detect_device

    device = detect_device()
    assessment = assess_fit(model_config, device)  # a local base_model folder's config.json is read as is
    if assessment is None:
        return None, ["  memory      unknown here: the base model's config.json is not shipped or local"]
    lines = ["  " + line for line in assessment.plan.render().splitlines()]
    lines.append(f"  {'fits' if assessment.fits else 'does NOT fit'} in {assessment.where()}")
    lines += [f"    {knob}" for knob in assessment.knobs[:4]]
    return assessment.summary(), lines


def command_validate(args: argparse.Namespace) -> int:
    from lora_pipeline.config.registry import load_config_file, partition_key_for
    from lora_pipeline.ml.tiny import BUILTIN_PREFIX

    model_config = load_config_file(args.config, args.overrides)
    key = partition_key_for(args.config)
    source = model_config.dataset.source
    data_checked = _is_local_source(source)
    cleaned, (train_rows, eval_rows) = _check_data_early(model_config) if data_checked else (None, (None, None))
    summary = {
        "partition": key,
        "config_hash": model_config.canonical_hash(),
        "base_model": model_config.base_model,
        "builtin_base": model_config.base_model.startswith(BUILTIN_PREFIX),
        "method": "QLoRA" if model_config.quantization.mode in ("nf4", "fp4") else
        ("LoRA on int8" if model_config.quantization.mode == "int8" else "LoRA"),
        "dataset": source,
        "format": cleaned.loaded.format if cleaned else None,
        "format_detected": cleaned.loaded.detected if cleaned else None,
        "cleaning": cleaned.counts if cleaned else None,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
    }
    summary["memory_plan"], memory_lines = _memory_summary(model_config)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.config}: valid (model {key}, config {summary['config_hash'][:12]})")
        print(f"  base model  {summary['base_model']} ({summary['method']}, quantization {model_config.quantization.mode})")
        if cleaned is not None:
            counts = cleaned.counts
            detected = " (detected)" if cleaned.loaded.detected else ""
            print(f"  dataset     {source}: {counts['rows_in']} {cleaned.loaded.format}{detected} rows -> "
                  f"{train_rows} training, {eval_rows} held-out")
            dropped = counts["empty"] + counts["exact_duplicates"] + counts["normalized_duplicates"]
            if dropped:
                print(f"              dropped {counts['empty']} empty, {counts['exact_duplicates']} exact and "
                      f"{counts['normalized_duplicates']} case/whitespace duplicates (token lengths are "
                      "checked when formatted_dataset runs)")
        else:
            print(f"  dataset     {source}: remote, read when raw_dataset runs")
        print("\n".join(memory_lines))
    return 0


def command_list(args: argparse.Namespace) -> int:
    from lora_pipeline.assets.common import MODEL_PARTITIONS
    from lora_pipeline.assets.provenance import newest_materialization
    from lora_pipeline.config.registry import ConfigRegistry

    registry = ConfigRegistry()
    instance = _instance()
    known = set(instance.get_dynamic_partitions(MODEL_PARTITIONS.name))
    new_keys = [key for key in registry.keys if key not in known]
    if new_keys:
        instance.add_dynamic_partitions(MODEL_PARTITIONS.name, new_keys)
    rows = []
    for key in sorted(known | set(registry.keys)):
        states = {}
        for name in ASSET_ORDER:
            record = newest_materialization(instance, key, name)
            states[name] = record.timestamp if record is not None else None
        rows.append(
            {
                "model": key,
                "config": str(registry.path_of(key)) if key in registry.keys else None,
                "materialized": states,
                "stale": _stale_in(instance, key, registry) if any(states.values()) else [],
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no model configs in {registry.config_dir}")
        return 0
    for row in rows:
        done = [name for name in ASSET_ORDER if row["materialized"][name]]
        latest = max((t for t in row["materialized"].values() if t), default=None)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(latest)) if latest else "never"
        state = f"{len(done)}/6 assets"
        if done and row["stale"] is not None:
            state += f", {len(row['stale'])} stale" if row["stale"] else ", up to date"
        print(f"{row['model']:<24} {state:<22} last run {when:<16} {row['config'] or '(run from elsewhere)'}")
        if row["stale"]:
            print(f"{'':<24} stale: {', '.join(row['stale'])} (`lora-pipeline run {row['config']}` re-runs them)")
    return 0


def _stale_in(instance, key: str, registry) -> list[str] | None:
    """The model's materialized assets that its config file, data, libraries or code have made stale;
    None when that cannot be said here (no config file, an invalid one, a source that cannot be read)."""
    from lora_pipeline.assets.provenance import readable_source_version, stale_assets

    if key not in registry.keys:
        return None
    try:
        model_config = registry.load(key)
    except LoraPipelineError:
        return None
    source_version = readable_source_version(model_config)
    return None if source_version is None else stale_assets(instance, key, model_config, source_version)


COMMANDS = {"run": command_run, "validate": command_validate, "list": command_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        user_error = _user_error_in(exc)
        if args.debug:
            raise
        if user_error is not None:
            print(f"error: {user_error}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
              " (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
