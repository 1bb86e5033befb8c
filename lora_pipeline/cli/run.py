"""`lora-pipeline run`: materialize a model's selected assets that are not up to date, and say where they are."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from lora_pipeline.assets.handoff import REQUESTED_TAG
from lora_pipeline.assets.provenance import (
    plain_metadata,
    readable_source_version,
    reuse_from_siblings,
    up_to_date_assets,
)
from lora_pipeline.assets.settings import report_settings
from lora_pipeline.assets.stages import stage_names
from lora_pipeline.cli.selection import ON_DEMAND, selected_asset_names, selection
from lora_pipeline.cli.waiting import pool_wait_seconds
from lora_pipeline.cli.session import (
    EXIT_REFUSED,
    check_data_early,
    instance as open_instance,
    reclaim_dead_runs,
    register_partition,
)
from lora_pipeline.config.registry import load_config_file, load_sweep_file, partition_key_for
from lora_pipeline.errors import ConfigError, DataError
from lora_pipeline.reclaim import HOST_TAG, PID_TAG


EPILOG = f"""\
examples:
  lora-pipeline run configs/tiny-demo.yaml
  lora-pipeline run configs/tiny-demo.yaml --select +trained_adapter --set lora.r=8
  lora-pipeline run my-model.yaml --storage s3://bucket/lora --json
  lora-pipeline run configs/tiny-demo.yaml --select raw_dataset,formatted_dataset --set dataset.source=chats.jsonl
  HF_TOKEN=hf_... lora-pipeline run my-model.yaml --select published_model --set publish.repo_id=me/my-model
  lora-pipeline validate configs/llama-3.1-8b-qlora.yaml
  lora-pipeline list

selection (--select): comma-separated parts. A plain asset name selects it; '+name' adds
everything it depends on, 'name+' everything that depends on it (as Dagster's '+key:name' and
'key:name+'). Any other part is Dagster's selection syntax, e.g. 'key:merged_model or
key:eval_report', '1+key:eval_report' (one level up).
assets: {', '.join(stage_names())}; on demand, only when named: {', '.join(ON_DEMAND)}.
"""


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    """Declare `run` and its arguments."""
    parser = commands.add_parser(
        "run", parents=parents,
        help="materialize the pipeline for one model config",
        description=f"Materialize the selected assets (by default all {len(stage_names())} stages: "
        f"{', '.join(stage_names())}) for the model in CONFIG. "
        "The partition key is CONFIG's file name without .yaml. Assets whose newest artifact was made "
        "from the same code, libraries, config and data are up to date and skipped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="model config YAML (in configs/ or anywhere)")
    parser.add_argument("--select", default="*", metavar="SELECTION",
                        help=f"assets to materialize (default: all but the on-demand {' and '.join(ON_DEMAND)})")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.max_steps=20 (repeatable; values parsed as YAML)",
    )
    parser.add_argument(
        "--storage", metavar="URI",
        help="artifact store root: a folder or s3://bucket/prefix (default: $LORA_PIPELINE_STORAGE or ./artifacts)",
    )
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable summary as the last stdout line")
    parser.add_argument("--force", action="store_true",
                        help="run the selected assets even when they are up to date (an adapter already trained "
                        "from the same inputs is still reused; change training.seed to train another)")


@dataclass
class RunPlan:
    """One `run` invocation, resolved: which model, from which file, with which config and source content."""

    config_path: Path
    key: str
    model_config: object
    selected: list[str]
    source_version: str | None  # None when the source cannot be read now: raw_dataset will say why
    overrides: list[str] = field(default_factory=list)
    storage: str | None = None
    force: bool = False
    debug: bool = False
    siblings: list[str] = field(default_factory=list)  # a sweep's other variants, whose equal assets are reused
    tags: dict = field(default_factory=dict)


class ChampionRefused(Exception):
    """The run stopped at the champion stage because a gate refused the candidate (exit code 3)."""

    def __init__(self, run_id: str, failed: list[str]) -> None:
        super().__init__("; ".join(failed))
        self.run_id = run_id
        self.failed = failed
        self.assets: dict = {}
        self.up_to_date: list[str] = []  # what the refused run did not need to run


def do_cli(args: argparse.Namespace) -> int:
    """Resolve the arguments into a plan, run it, print the summary; a sweep file runs every variant, then its leaderboard."""
    # Until the job starts, a run imports millions of long-lived objects (torch, transformers, the
    # definitions) and makes little garbage: collecting meanwhile walks them again and again
    # (~1.3 s of a parity run). do_run freezes them and collects again from there.
    gc.disable()
    try:
        return _run_command(args)
    finally:
        gc.enable()


def _run_command(args: argparse.Namespace) -> int:
    variants = load_sweep_file(args.config, args.overrides)
    if variants is not None:
        from lora_pipeline.cli.sweep import do_sweep  # sweep.py builds on this module

        return do_sweep(args, variants)
    model_config = load_config_file(args.config, args.overrides)
    selected = selected_asset_names(selection(args.select))
    if not selected:
        raise ConfigError(f"--select {args.select!r} matches no asset")
    plan = RunPlan(args.config, partition_key_for(args.config), model_config, selected,
                   readable_source_version(model_config, args.storage), args.overrides, args.storage, args.force, args.debug)
    started = time.perf_counter()
    run_id, assets, up_to_date, refused = run_reporting_refusal(plan)
    waited = pool_wait_seconds(run_id)
    wall = time.perf_counter() - started - waited
    stream = sys.stderr if args.json else sys.stdout
    print_summary(plan.key, run_id, assets, wall, stream, set(up_to_date), waited)
    champion = champion_summary(plan, assets)
    if champion is not None:
        print_champion(champion, stream)
    if args.json:
        print(json.dumps({"partition": plan.key, "run_id": run_id, "wall_seconds": round(wall, 2),
                          "pool_wait_seconds": round(waited, 2), "assets": assets,
                          "up_to_date": up_to_date, **({"champion": champion} if champion is not None else {})}))
    return EXIT_REFUSED if refused or (champion is not None and not champion["promoted"]) else 0


def run_reporting_refusal(plan: RunPlan) -> tuple[str | None, dict, list[str], bool]:
    """do_run, where a refusal by the champion's gates is a result (the assets before it are published), not an error."""
    try:
        run_id, assets, up_to_date = do_run(plan)
        return run_id, assets, up_to_date, False
    except ChampionRefused as refusal:
        return refusal.run_id, refusal.assets, refusal.up_to_date, True


def champion_summary(plan: RunPlan, assets: dict) -> dict | None:
    """The champion decision of this run (or of the up-to-date one), as `--json` prints it; None when it was not selected."""
    from lora_pipeline.assets.champion import DECISION_FILE
    from lora_pipeline.resources.factory import default_resources

    if "champion" not in assets:
        return None
    storage = default_resources(storage_root=plan.storage)["storage"]
    decision = json.loads((storage.local_path(storage.current(plan.key, "champion")) / DECISION_FILE).read_text())
    return {key: decision[key] for key in ("promoted", "version", "candidate", "model", "gates")}


def print_champion(champion: dict, stream) -> None:
    """The decision in words: promoted or refused, and one line per failed gate."""
    if champion["promoted"]:
        print(f"\nchampion of {champion['model']}: {champion['version']} (promoted, every gate passed)", file=stream)
        return
    print(f"\ncandidate {champion['candidate']} NOT promoted; champion of {champion['model']} stays "
          f"{champion['version'] or 'none'}:", file=stream)
    for name, gate in champion["gates"].items():
        if not gate["passed"]:
            print(f"  gate {name} failed: {gate['detail']}", file=stream)


def do_run(plan: RunPlan) -> tuple[str | None, dict, list[str]]:
    """Run the plan's selected assets that are not up to date (all with force) on the CLI's instance.

    Returns the run id (None when nothing ran), {asset: {"uri", "metadata"}} for every selected
    asset, and the names of those that were up to date.
    """
    from lora_pipeline.resources.factory import default_resources

    instance = open_instance()
    reclaim_dead_runs(instance)
    register_partition(instance, plan.key, plan.config_path)
    resources = default_resources(storage_root=plan.storage)
    with settings_reported(instance, plan.key, plan.model_config, plan.source_version, plan.config_path,
                           plan.overrides):
        stages = [name for name in plan.selected if name not in ON_DEMAND]  # an on-demand stage runs when asked
        current = {} if plan.force else up_to_date_assets(instance, plan.key, stages, plan.model_config,
                                                           resources["storage"], plan.source_version)
        if plan.siblings and not plan.force:
            reused = reuse_from_siblings(instance, plan.key, plan.siblings, [n for n in stages if n not in current],
                                         plan.model_config, resources["storage"], plan.source_version)
            if reused:
                print(f"same as in another variant, reused: {', '.join(reused)}", file=sys.stderr)
            current.update(reused)
        to_run = [name for name in plan.selected if name not in current]
        if current:
            print(f"up to date, not run: {', '.join(current)}", file=sys.stderr)
        if not to_run:
            return None, {name: current[name] for name in plan.selected}, list(current)
        # What startup built lives as long as the process: out of the collector's way from here on.
        gc.freeze()
        gc.enable()
        check_before_loading(plan.model_config, to_run, resources)
        try:
            run_id = execute(plan, to_run, instance, resources).run_id
        except ChampionRefused as refusal:
            refusal.assets = _assets_of_run(instance, refusal.run_id, plan.selected, current)
            refusal.up_to_date = list(current)
            raise
    return run_id, _assets_of_run(instance, run_id, plan.selected, current), list(current)


def _assets_of_run(instance, run_id: str, selected: list[str], current: dict) -> dict:
    """{asset: {"uri", "metadata"}} of the selected assets: those the run materialized, and those up to date."""
    assets = {name: current[name] for name in selected if name in current}
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    for record in records:
        materialization = record.event_log_entry.dagster_event.event_specific_data.materialization
        name = materialization.asset_key.path[-1]
        if name in selected:
            metadata = plain_metadata(materialization.metadata)
            assets[name] = {"uri": metadata.get("uri"), "metadata": metadata}
    return {name: assets[name] for name in selected if name in assets}


def check_before_loading(model_config, to_run: list[str], resources: dict) -> None:
    """Fail fast, before any model is loaded: the training must fit the device, the data must read and clean."""
    if "trained_adapter" in to_run:
        from lora_pipeline.errors import ModelError
        from lora_pipeline.ml.base.fit import check_fits

        # The data is not tokenized yet, so no length that keeps 95% of the examples whole is known: no shorter
        # max_length is suggested here (trained_adapter's own check, after formatting, suggests one).
        try:
            check_fits(model_config, resources["compute"].info(), shortest=model_config.training.max_length)
        except ModelError as refused:
            raise ModelError(f"{refused}\na shorter training.max_length may fit too: `lora-pipeline validate CONFIG` "
                             "names the lengths that keep 95% and 99% of the examples whole") from None
    if "raw_dataset" in to_run:
        from lora_pipeline.ml.data.raw import release_unused_memory

        check_data_early(model_config)
        release_unused_memory()


def execute(plan: RunPlan, to_run: list[str], instance, resources: dict):
    """Materialize `to_run` in-process; a failed blocking data check becomes a DataError naming the check."""
    from lora_pipeline.cli.waiting import pool_wait_notices
    from lora_pipeline.definitions import build_definitions, tune
    from lora_pipeline.terminal import terminal_logger

    config_data = plan.model_config.model_dump(mode="json")
    run_config = {
        "ops": {name: {"config": config_data} for name in to_run},
        "loggers": {"console": {"config": {"log_level": "DEBUG" if plan.debug else "INFO",
                                           "tracebacks": plan.debug}}},
    }
    definitions = build_definitions(resources, loggers={"console": terminal_logger}, automation=False)
    # The run's id is chosen here, so a failure is looked up in this run, never in whichever ran last.
    run_id = str(uuid.uuid4())
    # The tune job leaves on-demand stages out; Dagster's implicit job of every asset holds them too.
    job = (definitions.resolve_implicit_global_asset_job_def() if set(to_run) & set(ON_DEMAND)
           else definitions.resolve_job_def(tune.name))
    try:
        with pool_wait_notices(instance, run_id):
            return job.execute_in_process(
                asset_selection=[dg.AssetKey(name) for name in to_run],
                partition_key=plan.key,
                run_config=run_config,
                instance=instance,
                run_id=run_id,
                tags={"lora_pipeline/config": str(plan.config_path), PID_TAG: str(os.getpid()),
                      HOST_TAG: socket.gethostname(), **plan.tags,
                      # Named on-demand stages run even beside the parents this run brings up to date.
                      **({REQUESTED_TAG: ",".join(requested)} if (requested := [
                          name for name in to_run if name in ON_DEMAND]) else {})},
            )
    except Exception:
        # Only this run's checks (a run that failed before it started has none).
        failed_checks = failed_checks_of(instance, run_id) if instance.has_run(run_id) else []
        if failed_checks and all(check.startswith("champion check") for check in failed_checks):
            raise ChampionRefused(run_id, failed_checks) from None
        if failed_checks:
            raise DataError("; ".join(failed_checks) + f" (run {run_id}; later assets were not built)") from None
        raise


@contextlib.contextmanager
def settings_reported(instance, key: str, model_config, source_version: str | None, config_path: Path,
                      overrides: list[str]):
    """Report the settings the run uses before it, and after a run with --set, the config file's again.

    Reported before, so that the run's materializations record them as their inputs' versions and
    a later edit of the file shows as stale in the UI. A run with --set made its assets from other
    settings than the file's; reporting the file's afterwards marks them stale in the UI, as the
    model_configs sensor, schedules and a plain `lora-pipeline run` see them.
    """
    report_settings(instance, key, model_config, source_version)
    try:
        yield
    finally:
        file_config = None
        if overrides:
            try:
                file_config = load_config_file(config_path)
            except ConfigError:
                pass  # the file alone is not a valid config: it has no settings of its own to show
        if file_config is not None:
            same_source = file_config.dataset == model_config.dataset
            report_settings(instance, key, file_config,
                            source_version if same_source else readable_source_version(file_config))


def failed_checks_of(instance, run_id: str) -> list[str]:
    """'asset check: description' for each asset check of the run that did not pass."""
    failures = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.event_specific_data
        if not evaluation.passed:
            failures.append(f"{evaluation.asset_key.path[-1]} check {evaluation.check_name}: {evaluation.description}")
    return failures


def print_summary(key: str, run_id: str | None, assets: dict, wall: float, stream,
                  up_to_date: set[str] = frozenset(), waited: float = 0.0) -> None:
    """Where every selected asset is, and the held-out losses when the report ran. wall: the run's own time,
    without the waited seconds its steps queued for a gpu pool slot."""
    ran = f"run {run_id} finished" if run_id else "everything up to date, nothing run,"
    queued = f" (and {waited:.0f}s waiting for the gpu pool)" if waited >= 1 else ""
    print(f"\nmodel {key}: {ran} in {wall:.0f}s{queued}", file=stream)
    for name, entry in assets.items():
        print(f"  {name:<18} {entry['uri']}{'  (up to date)' if name in up_to_date else ''}", file=stream)
    report = assets.get("eval_report")
    if report:
        meta = report["metadata"]
        if "adapter_preference_accuracy" in meta:
            print(f"\nheld-out preference accuracy ({meta['eval_pairs']} pairs): adapter "
                  f"{meta['adapter_preference_accuracy']:.3f} (95% CI {meta['adapter_preference_accuracy_ci95']}), "
                  f"reference {meta['reference_preference_accuracy']:.3f} ({meta['reference']}): "
                  f"{meta['adapter_preference_accuracy_vs_reference']}", file=stream)
        else:
            print(f"\nheld-out loss (per-example mean): base {meta.get('base_loss', float('nan')):.4f}, adapter "
                  f"{meta.get('adapter_loss', float('nan')):.4f} ({meta.get('adapter_vs_base_loss_change', 0):+.1%}), "
                  f"merged {meta.get('merged_loss', float('nan')):.4f}", file=stream)
        print(f"report: {Path(report['uri']) / 'report.md'}", file=stream)
    tracked = assets.get("trained_adapter", {}).get("metadata", {})
    if tracked.get("mlflow_run_id"):
        print(f"mlflow run: {tracked.get('mlflow_run_url') or tracked['mlflow_run_id']}", file=stream)
    published = assets.get("published_model")
    if published:
        print(f"published: {published['metadata'].get('commit_url')}", file=stream)
    exported = assets.get("gguf_export")
    if exported:
        meta = exported["metadata"]
        files = [meta.get("merged_file"), meta.get("base_file"), meta.get("adapter_file"), "Modelfile"]
        print(f"gguf: {meta.get('uri')} ({', '.join(name for name in files if name)})", file=stream)
        if meta.get("adapter_skipped"):
            print(f"  no adapter GGUF: {meta['adapter_skipped']}", file=stream)
