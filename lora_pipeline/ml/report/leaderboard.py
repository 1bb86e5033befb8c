"""A sweep's leaderboard: one row per variant, the Pareto front, and the variant to ship. Dagster-free.

The recommendation is the smallest variant (fewest trainable parameters) within noise of the
best: its paired difference with the best variant, on the same examples, is not confidently
worse than the margin. Seeds in a sweep show how big that noise is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_pipeline.ml.evaluation.pipeline import LOSS_DEFINITION

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Variant:
    """What the leaderboard knows of one sweep variant."""

    partition: str
    settings: dict
    adapter_dir: Path
    scores: "pd.DataFrame"  # the adapter's per-example scores on the suite
    intervals: dict  # metric -> {"value", "ci95"} (from the eval report)
    train_seconds: float
    peak_memory_mb: float
    suite: str
    extra: dict = field(default_factory=dict)
    train_flops: float = 0.0  # training_flops of its training summary


def training_flops(summary: dict) -> float:
    """The arithmetic a training did, estimated from what it trained on: per token 2 FLOPs per parameter forward,
    2 for the activations' gradients, 2 per trainable parameter for the weights' gradients, and one more forward
    with gradient checkpointing (attention's scores are left out). Unlike its wall time, it does not grow when
    other work shares the machine, so variants trained side by side or on a busy machine compare fairly."""
    total, trainable = summary.get("total_parameters", 0), summary.get("trainable_parameters", 0)
    forwards = 2 if summary.get("gradient_checkpointing") else 1
    return float(summary.get("train_tokens", 0)) * (2 * total * (forwards + 1) + 2 * trainable)


def adapter_parameters(adapter_dir: Path) -> tuple[int, int, float]:
    """(LoRA parameters, modules_to_save parameters, size in MB) of a saved PEFT adapter."""
    from safetensors import safe_open

    lora = full = 0
    size = 0
    for path in sorted(Path(adapter_dir).glob("*.safetensors")):
        size += path.stat().st_size
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                count = 1
                for dim in weights.get_slice(name).get_shape():
                    count *= dim
                # LoRA matrices (and DoRA's magnitude vectors) are named lora_*; anything else is a
                # module trained in full (modules_to_save) or a trained bias.
                if "lora_" in name:
                    lora += count
                else:
                    full += count
    return lora, full, round(size / 2**20, 3)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (cost, loss-like quality: lower is better on both) no other point beats on both."""
    front = []
    for name, (cost, quality) in points.items():
        dominated = any(
            other_cost <= cost and other_quality <= quality and (other_cost, other_quality) != (cost, quality)
            for other, (other_cost, other_quality) in points.items() if other != name
        )
        if not dominated:
            front.append(name)
    return front


def build_leaderboard(variants: list[Variant], metric: str, margin: float, resamples: int) -> dict:
    """leaderboard.json's content: rows (settings, parameters, metrics with intervals, cost), fronts and the recommendation."""
    from lora_pipeline.ml.evaluation.pipeline import LOWER_IS_BETTER, compare

    if not variants:
        raise ValueError("a leaderboard needs at least one evaluated variant")
    suites = {variant.suite for variant in variants}
    lower_better = metric in LOWER_IS_BETTER
    sign = 1.0 if lower_better else -1.0
    rows = []
    for variant in variants:
        lora, full, size_mb = adapter_parameters(variant.adapter_dir)
        rows.append({
            "partition": variant.partition,
            "settings": variant.settings,
            "lora_parameters": lora,
            "modules_to_save_parameters": full,
            "trainable_parameters": lora + full,
            "adapter_size_mb": size_mb,
            "metrics": variant.intervals,
            "train_seconds": round(variant.train_seconds, 2),
            "train_tflop": round(variant.train_flops / 1e12, 3),
            "peak_memory_mb": round(variant.peak_memory_mb, 1),
            **variant.extra,
        })
    noise = seed_noise(variants, metric)
    margin = max(margin, noise["floor"]) if noise else margin
    best = min(variants, key=lambda v: sign * v.intervals[metric]["value"])
    by_name = {variant.partition: variant for variant in variants}
    paired = len(suites) == 1
    for row in rows:
        if row["partition"] == best.partition:
            row["vs_best"] = {"verdict": "best", "sentence": f"{best.partition} is the best on {metric}"}
            continue
        if paired:
            comparison = compare(metric, row["partition"], best.partition,
                                 {row["partition"]: by_name[row["partition"]].scores, best.partition: best.scores},
                                 resamples, margin)
            row["vs_best"] = {key: comparison[key] for key in ("verdict", "sentence", "difference", "wins", "ties", "losses")}
        else:
            row["vs_best"] = {"verdict": "not paired", "sentence": "variants were scored on different examples"}
    # Blends are compared, not recommended: they were not trained, gated or evaluated on their own.
    within_noise = [row for row in rows if row["vs_best"]["verdict"] in ("best", "within noise")
                    and row.get("kind") != "blend"] or [row for row in rows if row.get("kind") != "blend"]
    recommended = min(within_noise, key=lambda row: (row["trainable_parameters"], row["train_tflop"]))
    quality = {row["partition"]: sign * row["metrics"][metric]["value"] for row in rows}
    return {
        "metric": metric,
        "higher_is_better": not lower_better,
        "margin": margin,
        "seed_noise": noise,
        "paired": paired,
        "best": best.partition,
        "recommended": recommended["partition"],
        "why": (f"{recommended['partition']} is the smallest variant ({recommended['trainable_parameters']:,} trainable "
                f"parameters) within noise of the best on {metric} ({best.partition})"
                if recommended["partition"] != best.partition else
                f"{best.partition} is the best on {metric} and no smaller variant is within noise of it"),
        "pareto_parameters": pareto_front({p: (r["trainable_parameters"], quality[p]) for p, r in _named(rows)}),
        "pareto_time": pareto_front({p: (r["train_seconds"], quality[p]) for p, r in _named(rows)}),  # wall time
        "pareto_compute": pareto_front({p: (r["train_tflop"], quality[p]) for p, r in _named(rows)}),
        "rows": rows,
    }


def seed_noise(variants: list[Variant], metric: str) -> dict | None:
    """How much the seed alone moves the metric, when the sweep varies a seed: per group of variants equal but
    for their seeds, the range of the metric; the floor is the largest range. None without seeds."""
    seeds = [key for key in (variants[0].settings if variants else {}) if key.rsplit(".", 1)[-1] == "seed"]
    if not seeds:
        return None
    groups: dict[str, list[float]] = {}
    for variant in variants:
        rest = {key: value for key, value in variant.settings.items() if key not in seeds}
        groups.setdefault(repr(sorted(rest.items())), []).append(variant.intervals[metric]["value"])
    ranges = [max(values) - min(values) for values in groups.values() if len(values) > 1]
    if not ranges:
        return None
    return {"floor": max(ranges), "groups": len(ranges),
            "note": f"the seed alone moves {metric} by up to {max(ranges):.4f}; differences smaller than that are "
                    "treated as noise (the margin is at least this)"}


def _named(rows: list[dict]):
    return [(row["partition"], row) for row in rows]


def leaderboard_markdown(board: dict, title: str) -> str:
    """The leaderboard as a readable report."""
    metric = board["metric"]
    lines = [f"# {title}", "", f"**Recommended: {board['recommended']}**: {board['why']}.", "",
             f"Compared on {metric}{' (the ' + LOSS_DEFINITION + ')' if metric == 'loss' else ''} "
             f"({'higher' if board['higher_is_better'] else 'lower'} is better), paired "
             f"bootstrap 95% intervals, margin {board['margin']:g}. Pareto front (quality vs trainable parameters): "
             f"{', '.join(board['pareto_parameters'])}; (quality vs training compute): {', '.join(board['pareto_compute'])}. "
             "train TFLOP: the training's arithmetic, estimated from its tokens and parameters; train s: its wall "
             "time, which counts whatever else the machine was doing.",
             *([f"Seeds: {board['seed_noise']['note']}.", ""] if board.get("seed_noise") else []),
             "", "| variant | settings | LoRA params | modules_to_save params | size MB | train TFLOP | train s | "
             f"peak MB | {metric} [95% CI] | vs best |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in board["rows"]:
        value = row["metrics"][metric]
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
        lines.append(
            f"| {row['partition']} | {settings} | {row['lora_parameters']:,} | {row['modules_to_save_parameters']:,} | "
            f"{row['adapter_size_mb']} | {row['train_tflop']} | {row['train_seconds']} | {row['peak_memory_mb']} | "
            f"{value['value']:.4f} "
            f"[{value['ci95'][0]:.4f}, {value['ci95'][1]:.4f}] | {row['vs_best']['verdict']} |"
        )
    lines += ["", *[f"- {row['partition']}: {row['vs_best']['sentence']}" for row in board["rows"]],
              "", "![quality vs trainable parameters](leaderboard.png)", ""]
    return "\n".join(lines)


def leaderboard_png(board: dict) -> bytes:
    """Each variant's difference from the best with the paired 95% interval the verdicts use (the best at 0),
    against trainable parameters, the recommendation marked. Unpaired (variants scored on other examples): each
    one's own interval, and the title says so."""
    from lora_pipeline.ml.report.plots import _figure, _png

    plt, (fig, ax) = _figure()
    metric = board["metric"]
    paired = board.get("paired", True)
    for row in board["rows"]:
        difference = row.get("vs_best", {}).get("difference")
        if paired:
            value = difference or {"value": 0.0, "ci95": [0.0, 0.0]}  # the best, against itself
        else:
            value = row["metrics"][metric]
        low, high = value["ci95"]
        ax.errorbar([row["trainable_parameters"]], [value["value"]],
                    yerr=[[max(value["value"] - low, 0.0)], [max(high - value["value"], 0.0)]], fmt="o", capsize=3,
                    color="tab:red" if row["partition"] == board["recommended"] else "tab:blue")
        ax.annotate(row["partition"].rsplit(".", 1)[-1], (row["trainable_parameters"], value["value"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    if paired:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (LoRA + modules_to_save)")
    ax.set_ylabel(f"{metric} minus {board['best']}'s (paired 95% CI)" if paired else f"{metric} (95% CI, unpaired)")
    ax.set_title(f"recommended: {board['recommended']}")
    ax.grid(alpha=0.3)
    return _png(plt, fig)
