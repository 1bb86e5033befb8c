"""`lora-pipeline promote` and `lora-pipeline rollback`: choose which adapter is a model's champion."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_pipeline.config.registry import ConfigRegistry, load_config_file, partition_key_for
from lora_pipeline.cli.session import EXIT_REFUSED
from lora_pipeline.errors import ConfigError

GATES_HELP = """\
gates (all must pass; thresholds under promotion: in the config):
  better_than_base  the 95% interval of the paired difference vs the base clears promotion.min_improvement
  no_regression     not worse than the current champion, same examples, beyond promotion.max_regression
  forgetting        general-text loss rose at most promotion.max_forgetting (relative) vs the base
  merge_fidelity    merged model's loss within promotion.max_merge_drift of the adapter's
  servable          vLLM can serve the adapter as an adapter (required when promotion.serving is 'adapter')
  recommended       sweep variants only: the one the sweep's leaderboard recommends

exit codes: 0 promoted (or would be, with --dry-run), 3 a gate refused the candidate, 2 a user error.
"""


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    """Declare `promote` and `rollback`."""
    promote = commands.add_parser(
        "promote", parents=parents,
        help="promote a model's newest evaluated candidate to champion when every gate passes",
        description="Run the champion stage for CONFIG's newest evaluated adapter: every gate is checked, and when "
        "all pass the adapter becomes the model's champion (recorded in the artifact store with its card and vLLM "
        "serving files). --dry-run explains every gate and changes nothing.",
        epilog="examples:\n  lora-pipeline promote configs/tiny-demo.yaml --dry-run\n"
               "  lora-pipeline promote configs/tiny-demo.yaml --json\n\n" + GATES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    promote.add_argument("config", type=Path, help="model config YAML whose candidate to promote")
    _common(promote)
    promote.add_argument("--dry-run", action="store_true", help="explain every gate; promote nothing")
    rollback = commands.add_parser(
        "rollback", parents=parents,
        help="make an earlier champion of a model current again",
        description="Append a rollback to MODEL's champion history: the champion before the current one, or the one "
        "with --to VERSION (a prefix is enough), becomes current. Nothing is deleted; `lora-pipeline list` and the "
        "next promotion's no_regression gate see the restored champion.",
        epilog="examples:\n  lora-pipeline rollback tiny-demo\n  lora-pipeline rollback tiny-demo --to 3f2a9c",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rollback.add_argument("model", help="model key (the config file's name without .yaml; a sweep's name)")
    rollback.add_argument("--to", metavar="VERSION", help="the champion version to restore (default: the previous one)")
    _common(rollback)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", metavar="URI",
                        help="artifact store root (default: $LORA_PIPELINE_STORAGE or ./artifacts)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable result as the last stdout line")


def do_cli(args: argparse.Namespace) -> int:
    """Dispatch to promote or rollback."""
    return do_rollback(args) if args.command == "rollback" else do_promote(args)


def do_promote(args: argparse.Namespace) -> int:
    """Explain the gates (--dry-run) or run the champion stage for the config's current candidate."""
    from lora_pipeline.assets.champion import CANDIDATE_ASSETS, decide_promotion
    from lora_pipeline.assets.provenance import readable_source_version
    from lora_pipeline.cli.run import RunPlan, champion_summary, print_champion, run_reporting_refusal
    from lora_pipeline.resources.factory import default_resources
    from lora_pipeline.resources.storage import ArtifactIntegrityError

    model_config = load_config_file(args.config)
    key = partition_key_for(args.config)
    resources = default_resources(storage_root=args.storage)
    storage = resources["storage"]
    stream = sys.stderr if args.json else sys.stdout
    if args.dry_run:
        try:
            refs = {name: storage.current(key, name) for name in CANDIDATE_ASSETS}
        except ArtifactIntegrityError as missing:
            raise ConfigError(f"{args.config}: {missing}; run `lora-pipeline run {args.config}` first") from None
        decision = decide_promotion(storage, resources["compute"].info(), model_config, key,
                                    _sweep_of(key), refs)
        summary = decision.summary()
        print(f"candidate {decision.candidate_version} for {decision.owner} (champion now: "
              f"{decision.current_version or 'none'}); dry run, nothing changed:", file=stream)
        for gate in decision.gates:
            print(f"  {'pass' if gate.passed else 'FAIL'}  {gate.name}: {gate.detail}", file=stream)
        print(f"would {'promote' if decision.promoted else 'refuse'} it", file=stream)
        if args.json:
            print(json.dumps({**summary, "dry_run": True}))
        return 0 if decision.promoted else EXIT_REFUSED
    unchanged = _already_champion(storage, key)
    if unchanged is not None:
        print(f"{unchanged['version']} is already the champion of {unchanged['model']} (since {unchanged['since']}): "
              "nothing to do", file=stream)
        if args.json:
            print(json.dumps(unchanged))
        return 0
    plan = RunPlan(args.config, key, model_config, ["champion"], readable_source_version(model_config, args.storage),
                   storage=args.storage, force=True)
    _, assets, _, refused = run_reporting_refusal(plan)
    champion = champion_summary(plan, assets)
    print_champion(champion, stream)
    if args.json:
        print(json.dumps(champion))
    return EXIT_REFUSED if refused or not champion["promoted"] else 0


def _already_champion(storage, key: str) -> dict | None:
    """The --json summary of a no-op when the model's newest adapter is its owner's champion already, else None."""
    from lora_pipeline.assets.champion import artifact_version
    from lora_pipeline.resources.records import ChampionHistory
    from lora_pipeline.resources.storage import ArtifactIntegrityError

    owner = _sweep_of(key) or key
    current = ChampionHistory(storage, owner).current()
    try:
        candidate = artifact_version(storage.current(key, "trained_adapter"))
    except ArtifactIntegrityError:
        return None  # nothing trained: the champion stage says what to run
    if current is None or current.version != candidate:
        return None
    return {"promoted": True, "unchanged": True, "version": candidate, "candidate": candidate, "model": owner,
            "since": current.at}


def _sweep_of(key: str) -> str | None:
    try:
        return ConfigRegistry().sweep_of(key)
    except ConfigError:
        return None


def do_rollback(args: argparse.Namespace) -> int:
    """Restore an earlier champion, and with MLflow tracking move the registered model's alias back to it."""
    from lora_pipeline.resources.factory import default_resources
    from lora_pipeline.resources.records import ChampionHistory

    resources = default_resources(storage_root=args.storage)
    history = ChampionHistory(resources["storage"], args.model)
    before = history.current()
    event = history.rollback(args.to)
    stream = sys.stderr if args.json else sys.stdout
    print(f"champion of {args.model}: {event.version} (was {before.version})", file=stream)
    tracked = _champion_alias_moved(resources, args.model, event)
    if tracked:
        print(f"MLflow: {tracked['mlflow_champion']} is version {tracked['mlflow_model_version']} again", file=stream)
    if args.json:
        print(json.dumps({"model": args.model, "version": event.version, "previous": before.version,
                          "sequence": event.sequence, **_alias_summary(tracked)}))
    return 0


def _champion_alias_moved(resources: dict, owner: str, event) -> dict:
    """The MLflow alias 'champion' pointed at the restored champion's registered version, as a promotion points it;
    nothing when its config (the partition it was promoted from) has MLflow tracking off or is gone."""
    from lora_pipeline.resources.artifacts import ArtifactRef

    try:
        model_config = ConfigRegistry().load(event.partition)
    except ConfigError:
        return {}
    if not model_config.tracking.mlflow:
        return {}
    adapter, base = (ArtifactRef.from_entry(event.candidate[name]) for name in ("trained_adapter", "quantized_base"))
    try:
        return resources["tracker"].promoted(model_config.tracking, owner, resources["storage"], adapter, base,
                                             model_config.trust_remote_code)
    except Exception as exc:  # the MLflow client raises many types; all mean the alias did not move
        raise RuntimeError(
            f"champion of {owner} is {event.version} again, but MLflow's alias 'champion' did not move "
            f"({type(exc).__name__}: {exc}); run `lora-pipeline rollback {owner} --to {event.version}` once MLflow "
            "answers"
        ) from exc


def _alias_summary(tracked: dict) -> dict:
    return {key: tracked[key] for key in ("mlflow_champion", "mlflow_model_version") if key in tracked}
