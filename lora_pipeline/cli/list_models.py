"""`lora-pipeline list`: the configured models, when their assets were made, and which are stale."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lora_pipeline.assets.common import MODEL_PARTITIONS
from lora_pipeline.assets.provenance import newest_materialization, readable_source_version, stale_assets
from lora_pipeline.assets.stages import stage_names
from lora_pipeline.cli.session import instance as open_instance
from lora_pipeline.config.registry import ConfigRegistry, is_model_key
from lora_pipeline.errors import LoraPipelineError


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    """Declare `list` and its arguments."""
    parser = commands.add_parser(
        "list", parents=parents,
        help="list the configured models and the state of their assets",
        description="List the model configs in the config folder and models run from elsewhere, with "
        "when each asset was last materialized and which are stale: made from other settings, data, libraries "
        "or code than the config file's now, so `lora-pipeline run` would redo them.",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.add_argument("--storage", metavar="URI",
                        help="artifact store whose champions to show (default: $LORA_PIPELINE_STORAGE or ./artifacts)")


def do_cli(args: argparse.Namespace) -> int:
    """List the models (text or JSON)."""
    registry = ConfigRegistry()
    for path, problem in registry.problems.items():  # reported, and the other models listed
        print(f"warning: {path} is not listed: {problem}", file=sys.stderr)
    rows = do_list(registry, getattr(args, "storage", None))
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no model configs in {registry.config_dir}")
    else:
        print_rows(rows)
    return 0


def do_list(registry: ConfigRegistry, storage_root: str | None = None) -> list[dict]:
    """One row per model: its config file, when each asset was last materialized, and what is stale.

    Configs new to the instance are registered as partitions on the way.
    """
    from lora_pipeline.resources.factory import default_resources
    from lora_pipeline.resources.records import ChampionHistory

    storage = default_resources(storage_root=storage_root)["storage"]
    instance = open_instance()
    known = set(instance.get_dynamic_partitions(MODEL_PARTITIONS.name))
    new_keys = [key for key in registry.keys if key not in known]
    if new_keys:
        instance.add_dynamic_partitions(MODEL_PARTITIONS.name, new_keys)
    rows = []
    # A partition registered under a name the store refuses (by an older version, or by hand) is left out.
    for key in sorted(key for key in known | set(registry.keys) if is_model_key(key)):
        states = {}
        for name in stage_names():
            record = newest_materialization(instance, key, name)
            states[name] = record.timestamp if record is not None else None
        rows.append({
            "model": key,
            "config": str(registry.path_of(key)) if key in registry.keys else None,
            "materialized": states,
            "stale": stale_in(instance, key, registry, storage) if any(states.values()) else [],
            "champion": _champion_version(ChampionHistory(storage, registry.sweep_of(key) or key)),
        })
    return rows


def print_rows(rows: list[dict]) -> None:
    """The listing for a person: one line per model, and what is stale under it."""
    for row in rows:
        done = [name for name, when in row["materialized"].items() if when]
        latest = max((t for t in row["materialized"].values() if t), default=None)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(latest)) if latest else "never"
        state = f"{len(done)}/{len(row['materialized'])} assets"
        if done and row["stale"] is not None:
            state += f", {len(row['stale'])} stale" if row["stale"] else ", up to date"
        champion = f"champion {row['champion']}" if row.get("champion") else "no champion"
        print(f"{row['model']:<24} {state:<22} last run {when:<16} {champion:<26} {row['config'] or '(run from elsewhere)'}")
        if row["stale"]:
            print(f"{'':<24} stale: {', '.join(row['stale'])} (`lora-pipeline run {row['config']}` re-runs them)")


def _champion_version(history) -> str | None:
    current = history.current()
    return current.version if current is not None else None


def stale_in(instance, key: str, registry: ConfigRegistry, storage=None) -> list[str] | None:
    """The model's materialized assets that its config file, data, libraries or code have made stale;
    None when that cannot be said here (no config file, an invalid one, a source that cannot be read)."""
    if key not in registry.keys:
        return None
    try:
        model_config = registry.load(key)
    except LoraPipelineError:
        return None
    source_version = readable_source_version(model_config, storage)
    return None if source_version is None else stale_assets(instance, key, model_config, source_version)
