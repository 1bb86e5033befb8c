"""`lora-pipeline run SWEEP.yaml`: every variant of a sweep run (sharing what they have in common), ranked on the
sweep's leaderboard, and the recommended one handed to the champion stage (and any on-demand stage selected)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lora_pipeline.assets.champion import SWEEP_TAG
from lora_pipeline.assets.provenance import readable_source_version
from lora_pipeline.cli.run import (
    RunPlan,
    champion_summary,
    do_run,
    print_champion,
    print_summary,
    run_reporting_refusal,
)
from lora_pipeline.cli.selection import ON_DEMAND, selected_asset_names, selection
from lora_pipeline.cli.waiting import pool_wait_seconds
from lora_pipeline.assets.stages import stage_names
from lora_pipeline.cli.session import EXIT_REFUSED, instance as open_instance
from lora_pipeline.config.registry import partition_key_for, read_yaml, sweep_blends, value_at
from lora_pipeline.errors import ConfigError


def do_sweep(args: argparse.Namespace, variants: dict) -> int:
    """Run every variant of a sweep (sharing what they have in common), rank them, and promote the recommended one."""
    sweep = partition_key_for(args.config)
    selected = selected_asset_names(selection(args.select))
    per_variant = [name for name in selected if name != "champion" and name not in ON_DEMAND]
    after_ranking = [name for name in selected if name == "champion" or name in ON_DEMAND]
    if set(after_ranking) & set(ON_DEMAND) and "eval_report" not in per_variant:
        # A sweep hands off the variant its leaderboard recommends, which needs every variant's report: those
        # stages run too (what is up to date is not run again).
        wanted = set(per_variant) | set(selected_asset_names(selection("+eval_report")))
        per_variant = [name for name in stage_names() if name in wanted]
    started = time.perf_counter()
    stream = sys.stderr if args.json else sys.stdout
    results = {}
    for index, (key, model_config) in enumerate(variants.items(), start=1):
        print(f"\n=== sweep {sweep}: variant {index}/{len(variants)}: {key}", file=sys.stderr)
        variant_started = time.perf_counter()  # each variant's own time, not the sweep's so far
        plan = RunPlan(args.config, key, model_config, per_variant, readable_source_version(model_config, args.storage),
                       args.overrides, args.storage, args.force, args.debug, siblings=list(variants),
                       tags={SWEEP_TAG: sweep})
        run_id, assets, up_to_date = do_run(plan)
        waited = pool_wait_seconds(run_id)  # behind another run: not this variant's time
        wall = time.perf_counter() - variant_started - waited
        results[key] = {"run_id": run_id, "assets": assets, "up_to_date": up_to_date, "wall_seconds": round(wall, 2),
                        "pool_wait_seconds": round(waited, 2)}
        print_summary(key, run_id, assets, wall, stream, set(up_to_date), waited)
    summary: dict = {"partition": sweep, "variants": results}
    if "eval_report" in per_variant:
        board_uri, board = rank_variants(args, sweep, variants)
        summary["leaderboard"] = {"uri": board_uri, "recommended": board["recommended"]}
        print(f"\nleaderboard: {board_uri}/leaderboard.md\nrecommended: {board['recommended']} ({board['why']})",
              file=stream)
        if after_ranking:
            key = board["recommended"]
            plan = RunPlan(args.config, key, variants[key], after_ranking, readable_source_version(variants[key], args.storage),
                           args.overrides, args.storage, args.force, args.debug, tags={SWEEP_TAG: sweep})
            _, assets, _, refused = run_reporting_refusal(plan)
            champion = champion_summary(plan, assets)
            if champion is not None:
                summary["champion"] = champion
                print_champion(champion, stream)
            if "published_model" in assets:
                summary["published"] = assets["published_model"]["metadata"].get("commit_url")
                print(f"published: {summary['published']}", file=stream)
            if "gguf_export" in assets:
                summary["gguf_export"] = assets["gguf_export"]["uri"]
                print(f"GGUF files of {key}: {summary['gguf_export']}", file=stream)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    if args.json:
        print(json.dumps(summary))
    champion = summary.get("champion")
    return EXIT_REFUSED if champion is not None and not champion["promoted"] else 0


def rank_variants(args: argparse.Namespace, sweep: str, variants: dict) -> tuple[str, dict]:
    """Materialize the sweep's leaderboard from its variants' current reports; returns its folder and content."""
    from lora_pipeline.assets.leaderboard import LEADERBOARD_FILE, SWEEP_PARTITIONS
    from lora_pipeline.definitions import build_definitions
    from lora_pipeline.resources.factory import default_resources
    from lora_pipeline.terminal import terminal_logger

    instance = open_instance()
    if not instance.has_dynamic_partition(SWEEP_PARTITIONS.name, sweep):
        instance.add_dynamic_partitions(SWEEP_PARTITIONS.name, [sweep])
    data = read_yaml(args.config)
    grid = data["sweep"]
    settings = {key: json.dumps({path: value_at(config.model_dump(mode="json"), path) for path in grid})
                for key, config in variants.items()}
    blends = json.dumps(sweep_blends(data, variants, str(args.config)))
    resources = default_resources(storage_root=args.storage)
    definitions = build_definitions(resources, loggers={"console": terminal_logger}, automation=False)
    definitions.resolve_job_def("leaderboard_job").execute_in_process(
        partition_key=sweep, instance=instance,
        run_config={"ops": {"leaderboard": {"config": {"variants": list(variants), "settings": settings,
                                                       "blends": blends}}},
                    "loggers": {"console": {"config": {"log_level": "DEBUG" if args.debug else "INFO",
                                                       "tracebacks": args.debug}}}},
    )
    storage = resources["storage"]
    folder = storage.local_path(storage.current(sweep, "leaderboard"))
    return storage.current(sweep, "leaderboard").uri, json.loads((folder / LEADERBOARD_FILE).read_text())
