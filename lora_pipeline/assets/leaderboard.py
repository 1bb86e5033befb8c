"""The leaderboard of a sweep: its variants side by side, and the one to ship.

A sweep file (a config with a `sweep:` section) is one partition per variant of the model
stages, and one partition of the `sweeps` partitions here. The leaderboard reads each variant's
current eval report and adapter from the store.
"""


import json

import dagster as dg
import pandas as pd
from pydantic import Field

from lora_pipeline.assets.common import ARTIFACT_IO, read_json, write_json
from lora_pipeline.assets.provenance import mark_stage_start
from lora_pipeline.config.registry import validate_config, value_at
from lora_pipeline.ml.report.leaderboard import (
    Variant,
    build_leaderboard,
    leaderboard_markdown,
    leaderboard_png,
    training_flops,
)
from lora_pipeline.ml.report.plots import markdown_image
from lora_pipeline.ml.report.metrics_report import EXAMPLES_FILE
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.artifacts import LINEAGE
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

SWEEP_PARTITIONS = dg.DynamicPartitionsDefinition(name="sweeps")
LEADERBOARD_FILE = "leaderboard.json"


class LeaderboardConfig(dg.Config):
    """Which variants the leaderboard ranks; empty: the sweep file's, from the config folder."""

    variants: list[str] = Field(default=[], description="Partition keys of the sweep's variants (default: all of them).")
    settings: dict[str, str] = Field(
        default={}, description="Per variant, its swept keys and values as a JSON object (default: from the sweep file)."
    )
    blends: str = Field(
        default="", description="The sweep file's `blends:` as JSON: weighted blends of the variants' adapters "
        "(PEFT's add_weighted_adapter), scored beside them (default: from the sweep file).",
    )


@dg.asset(
    partitions_def=SWEEP_PARTITIONS,
    io_manager_key=ARTIFACT_IO,
    kinds={"python"},
    group_name="decision",
    deps=[dg.AssetDep("eval_report", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("trained_adapter", partition_mapping=dg.AllPartitionMapping())],
    code_version="1",
)
def leaderboard(context: dg.AssetExecutionContext, config: LeaderboardConfig, registry: ModelRegistry,
                storage: ArtifactStore) -> dg.Output[ArtifactRef]:
    """One row per sweep variant: its settings, LoRA and modules_to_save parameters counted apart, adapter size,
    training time, peak memory, every metric with its 95% interval, and how it compares with the best (paired);
    the Pareto fronts (quality vs parameters, vs time), a plot, and the recommendation: the smallest variant
    within noise of the best (leaderboard.json, leaderboard.md)."""
    mark_stage_start()
    sweep = context.partition_key
    known = registry.configs()
    variants = list(config.variants) or known.variants_of(sweep)
    if not variants:
        raise dg.Failure(f"sweep {sweep!r} has no variants: no sweep file {sweep}.yaml in {known.config_dir} "
                         "and none given in the run config")
    # The config the variants were evaluated with (their reports' lineage), wherever the sweep file is.
    first_report = storage.local_path(storage.current(variants[0], "eval_report"))
    model_config = validate_config(read_json(first_report / LINEAGE)["config"], f"{variants[0]}'s eval report")
    # A preference sweep is ranked on held-out preference accuracy, as its gates are.
    metric = "preference_accuracy" if model_config.preference_tuning else model_config.promotion.metric
    entries = []
    for key in variants:
        report = storage.current(key, "eval_report")
        adapter = storage.current(key, "trained_adapter")
        report_dir, adapter_dir = storage.local_path(report), storage.local_path(adapter)
        examples = pd.read_parquet(report_dir / EXAMPLES_FILE)
        summary = read_json(adapter_dir / "training_summary.json")
        document = read_json(report_dir / "metrics.json")
        entries.append(Variant(
            partition=key,
            settings=json.loads(config.settings[key]) if key in config.settings else _swept_settings(known, key),
            adapter_dir=adapter_dir,
            scores=examples[examples["model"] == "adapter"].reset_index(drop=True),
            intervals=document["comparison"]["intervals"]["adapter"],
            train_seconds=float(summary.get("train_seconds", 0.0)),
            train_flops=training_flops(summary),
            peak_memory_mb=float(summary.get("peak_memory_bytes", 0)) / 2**20,
            suite=read_json(report_dir / LINEAGE).get("suite", ""),
            extra={"eval_report": report.uri, "trained_adapter": adapter.uri},
        ))
    resamples = model_config.eval.bootstrap_resamples
    with storage.staging_dir() as staging:
        blends = json.loads(config.blends) if config.blends else _file_blends(known, sweep)
        if blends:
            entries += blend_entries(context, storage, variants, blends, staging)
        board = build_leaderboard(entries, metric, model_config.promotion.min_improvement, resamples)
        for row in board["rows"]:
            if row.get("kind") == "blend":
                row["adapter"] = f"blends/{row['partition']}"  # inside this leaderboard's folder
        write_json(staging / LEADERBOARD_FILE, board)
        markdown = leaderboard_markdown(board, f"Sweep {sweep}")
        (staging / "leaderboard.md").write_text(markdown, encoding="utf-8")
        plot = leaderboard_png(board)
        (staging / "leaderboard.png").write_bytes(plot)
        record = {"stage": "leaderboard", "sweep": sweep, "variants": variants, "dagster_run_id": context.run_id,
                  "version": _version(board)}
        write_json(staging / LINEAGE, record)
        ref = storage.publish(staging, sweep, "leaderboard")
    context.log.info(f"sweep {sweep}: recommended {board['recommended']} ({board['why']})")
    return dg.Output(ref, data_version=dg.DataVersion(record["version"]), metadata={
        "uri": dg.MetadataValue.path(ref.uri),
        "recommended": board["recommended"],
        "best": board["best"],
        "variants": len(board["rows"]),
        "metric": metric,
        # The plot inline: the UI shows an asset's metadata, not the files in its folder.
        "leaderboard": dg.MetadataValue.md(markdown.replace("![quality vs trainable parameters](leaderboard.png)",
                                                            markdown_image(plot, "quality vs trainable parameters"))),
    })


def _file_blends(known, sweep: str) -> list[dict]:
    """The `blends:` of the sweep file in the config folder, if it is there."""
    variants = known.variants_of(sweep)
    return known.raw_file(variants[0]).get("blends") or [] if variants else []


def blend_entries(context: dg.AssetExecutionContext, storage: ArtifactStore, variants: list[str], blends: list[dict],
                  staging) -> list[Variant]:
    """Each blend of the variants' adapters, made on their shared base and scored on their suite; its adapter is
    saved under blends/<name>/ in the leaderboard's folder."""
    from lora_pipeline.assets.evaluation import eval_suite
    from lora_pipeline.config.schema import EvalSettings
    from lora_pipeline.ml.adapters import Blend
    from lora_pipeline.ml.base.precision import detect_device
    from lora_pipeline.ml.evaluation.pipeline import intervals_of, score_blends

    lineages = {key: read_json(storage.local_path(storage.current(key, "eval_report")) / LINEAGE) for key in variants}
    bases = {lineage["weights"]["base"] for lineage in lineages.values()}
    if len(bases) != 1:
        raise dg.Failure("blends need the sweep's variants on one base (by content); these have "
                         f"{len(bases)} (a swept quantization or base model makes several)")
    first = lineages[variants[0]]
    settings = EvalSettings(**first["config"]["eval"])
    formatted = ArtifactRef.from_entry(first["parents"]["formatted_dataset"])
    suite, digest = eval_suite(storage, formatted, settings)
    base_dir = storage.local_path(ArtifactRef.from_entry(first["parents"]["quantized_base"]))
    adapters = {key: storage.local_path(storage.current(key, "trained_adapter")) for key in variants}
    specs = [Blend(blend["name"], tuple(blend["weights"]), tuple(float(w) for w in blend["weights"].values()),
                   blend.get("combination", "linear"), blend.get("density")) for blend in blends]
    try:
        scored = score_blends(base_dir, adapters, specs, suite, detect_device(), staging / "blends", context.log.info,
                              first["config"].get("trust_remote_code", False))
    except ValueError as refused:  # a blend PEFT would get wrong (ml/adapters.py says which)
        raise dg.Failure(f"blend refused: {refused}") from None
    return [Variant(partition=spec.name,
                    settings={"blend": f"{spec.combination}: " + ", ".join(f"{w:g} x {a}" for a, w in zip(spec.adapters,
                                                                                                    spec.weights))},
                    adapter_dir=folder, scores=scores, intervals=intervals_of(scores, suite.metrics, settings.bootstrap_resamples),
                    train_seconds=0.0, peak_memory_mb=0.0, suite=digest, extra={"kind": "blend"})
            for spec, (scores, folder) in ((spec, scored[spec.name]) for spec in specs)]


def _swept_settings(known, key: str) -> dict:
    """The swept keys' values of a variant registered from a sweep file."""
    sweep = known.sweep_of(key)
    if sweep is None:
        return {}
    grid = known.raw_file(key).get("sweep", {})
    data = known.raw(key)  # a variant's data holds every swept key: the sweep set it
    return {path: value_at(data, path) for path in grid}


def _version(board: dict) -> str:
    import hashlib

    payload = {"rows": [(row["partition"], row.get("eval_report"), row.get("trained_adapter"), row["settings"])
                        for row in board["rows"]]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


OTHER_ASSETS = [leaderboard]
