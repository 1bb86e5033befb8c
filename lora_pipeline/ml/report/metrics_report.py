"""metrics.json and report.md from an evaluation. Dagster-free."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from lora_pipeline.ml.evaluation.pipeline import LOSS_DEFINITION, EvaluationResult
from lora_pipeline.ml.report.plots import bar_chart_png


# One row per (model, example): every per-example score, and each model's greedy answer.
EXAMPLES_FILE = "examples.parquet"


def relative_change(value: float, reference: float) -> float:
    """(value - reference) / reference; negative means lower than the reference."""
    return (value - reference) / reference if reference else 0.0


def metrics_document(result: EvaluationResult, merge_weights: str) -> dict:
    """The metrics.json content: one entry per model, plus the deltas people look for first."""
    document: dict = {name: dict(values) for name, values in result.metrics.items()}
    base_loss = result.metrics["base"]["loss"]
    adapter_loss = result.metrics["adapter"]["loss"]
    document["comparison"] = {
        "examples": result.examples,
        "adapter_vs_base_loss_change": relative_change(adapter_loss, base_loss),
        "merged_vs_adapter_loss_change": relative_change(result.metrics["merged"]["loss"], adapter_loss),
        "merge_weights": merge_weights,
    }
    document["comparison"]["paired"] = result.comparisons
    document["comparison"]["intervals"] = result.intervals
    if result.forgetting is not None:
        document["comparison"]["forgetting"] = result.forgetting
    if result.benchmarks:
        document["comparison"]["benchmarks"] = result.benchmarks
    if result.per_source:
        document["comparison"]["per_source"] = result.per_source
    if "merged_into_original" in result.metrics:
        document["comparison"]["merged_into_original_vs_adapter_loss_change"] = relative_change(
            result.metrics["merged_into_original"]["loss"], adapter_loss
        )
    return document


def report_markdown(document: dict, samples: list[dict[str, str]], title: str, extremes: list[dict] = ()) -> str:
    """A short human-readable report: the table, the deltas and a few answers side by side."""
    models = [name for name in document if name != "comparison"]
    lines = [
        f"# {title}",
        "",
        f"Held-out examples: {document['comparison']['examples']}. Loss: the {LOSS_DEFINITION}, as the intervals, "
        "gates and leaderboard use it; perplexity and token accuracy over all response tokens together.",
        "",
        "| model | loss (per-example mean) | perplexity | token accuracy |",
        "|---|---|---|---|",
    ]
    for name in models:
        m = document[name]
        lines.append(f"| {name} | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['token_accuracy']:.3f} |")
    comparison = document["comparison"]
    lines += interval_table(comparison.get("intervals", {}))
    lines += [
        "",
        f"- Adapter vs base: loss {comparison['adapter_vs_base_loss_change']:+.1%}.",
        f"- Merged ({comparison['merge_weights']} weights) vs adapter: loss {comparison['merged_vs_adapter_loss_change']:+.2%}.",
    ]
    if "merged_into_original_vs_adapter_loss_change" in comparison:
        lines.append(
            "- Merged into the original (unquantized) weights vs adapter: loss "
            f"{comparison['merged_into_original_vs_adapter_loss_change']:+.2%}. The adapter was trained "
            "against the quantized weights, so this gap is the cost of merging into the originals."
        )
    lines += ["", "## What the differences mean", ""]
    lines += [f"- {entry['sentence']}" for entry in comparison.get("paired", [])]
    forgetting = comparison.get("forgetting")
    if forgetting:
        lines.append(
            f"- Forgetting probe ({forgetting['passages']} general-text passages): loss {forgetting['base_loss']:.4f} "
            f"(base) -> {forgetting['adapter_loss']:.4f} (adapter), {forgetting['relative_change']:+.1%}. "
            + forgetting["paired"]["sentence"]
        )
    lines += benchmark_table(comparison.get("benchmarks", {}))
    lines += per_source_table(comparison.get("per_source", {}))
    lines += ["", "![held-out loss](loss_by_model.png)", "", "## Samples", "",
              "Each prompt is the held-out example's prompt exactly as training rendered it (its template, and "
              "for a thinking model its thinking as the data had it: the template's own switch is not touched); "
              "`lora-pipeline generate --thinking on|off` asks with the switch set.", ""]
    for index, sample in enumerate(samples, start=1):
        lines += [f"### {index}", "", "```", sample["prompt"].rstrip(), "```", ""]
        lines.append(f"- **reference**: {sample['reference'].strip()}")
        for name in models:
            if name in sample:
                lines.append(f"- **{name}**: {sample[name] or '(empty)'}")
        lines.append("")
    lines += biggest_changes(extremes)
    return "\n".join(lines)


def benchmark_table(benchmarks: dict[str, dict]) -> list[str]:
    """lm-evaluation-harness results of base and adapter, with lm-eval's standard errors."""
    if not benchmarks:
        return []
    lines = ["", "## Benchmarks (lm-evaluation-harness)", "", "| task | metric | base | adapter |", "|---|---|---|---|"]
    for task, scores in benchmarks["adapter"].items():
        for metric, value in scores.items():
            if metric.endswith("_stderr"):
                continue
            base = benchmarks["base"][task][metric]
            err = lambda model: benchmarks[model][task].get(f"{metric}_stderr", float("nan"))  # noqa: E731
            lines.append(f"| {task} | {metric} | {base:.3f} ± {err('base'):.3f} | {value:.3f} ± {err('adapter'):.3f} |")
    return lines


def per_source_table(per_source: dict[str, dict]) -> list[str]:
    """A mixture's held-out loss per source and model, with the adapter's change from the base."""
    if not per_source:
        return []
    models = [name for name in next(iter(per_source.values())) if name != "examples"]
    lines = ["", "## Held-out loss per source", "", "| source | examples | " + " | ".join(models)
             + " | adapter vs base |", "|---|---|" + "---|" * (len(models) + 1)]
    for source, values in per_source.items():
        change = relative_change(values["adapter"], values["base"]) if "base" in values else 0.0
        lines.append(f"| {source} | {values['examples']} | " + " | ".join(f"{values[m]:.4f}" for m in models)
                     + f" | {change:+.1%} |")
    return lines


def interval_table(intervals: dict[str, dict[str, dict]]) -> list[str]:
    """Each model's per-example metric means with their 95% intervals, as a markdown table."""
    if not intervals:
        return []
    metrics = list(next(iter(intervals.values())))
    lines = ["", "Per-example means with 95% bootstrap intervals:", "",
             "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, values in intervals.items():
        cells = [f"{values[m]['value']:.3f} [{values[m]['ci95'][0]:.3f}, {values[m]['ci95'][1]:.3f}]" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def biggest_changes(extremes: list[dict]) -> list[str]:
    """The examples where the adapter gained or lost most against the base, as report lines."""
    if not extremes:
        return []
    lines = ["## Biggest wins and losses (adapter vs base)", "", "| example | change | prompt | base | adapter |",
             "|---|---|---|---|---|"]
    for row in extremes:
        cells = [str(row["example"]), f"{row['change']:+.3f} {row['metric']}", _cell(row["prompt"]),
                 _cell(row.get("base_answer", "")), _cell(row.get("adapter_answer", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _cell(text: str, width: int = 80) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def extreme_examples(result: EvaluationResult, prompts, metric: str, count: int = 3) -> list[dict]:
    """The `count` examples the adapter improved most and the `count` it hurt most, on `metric`."""
    from lora_pipeline.ml.evaluation.pipeline import LOWER_IS_BETTER

    base, adapter = result.per_example["base"], result.per_example["adapter"]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    gain = sign * (adapter[metric] - base[metric])
    order = list(gain.sort_values(ascending=False).index)
    chosen = order[:count] + [index for index in order[::-1][:count] if index not in order[:count]]
    rows = []
    for index in chosen:
        row = {"example": int(index), "metric": metric, "change": float(adapter[metric][index] - base[metric][index]),
               "prompt": prompts[index]}
        if "answer" in adapter:
            row.update(base_answer=base["answer"][index], adapter_answer=adapter["answer"][index])
        rows.append(row)
    return rows


def report_html(document: dict, samples: list[dict[str, str]], title: str, plot_png: bytes) -> str:
    """The same report as a self-contained HTML page (the plot inlined), for a browser or a CI artifact."""
    models = [name for name in document if name != "comparison"]
    comparison = document["comparison"]
    metric_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{document[name]['loss']:.4f}</td>"
        f"<td>{document[name]['perplexity']:.2f}</td><td>{document[name]['token_accuracy']:.3f}</td></tr>"
        for name in models
    )
    sample_blocks = "".join(
        "<section><pre>" + html.escape(sample["prompt"].rstrip()) + "</pre><table>"
        + "".join(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(sample.get(name) or '(empty)')}</td></tr>"
            for name in ["reference", *models]
            if name in sample
        )
        + "</table></section>"
        for sample in samples
    )
    plot = base64.b64encode(plot_png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}pre{{background:#f4f4f4;padding:8px}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Held-out examples: {comparison['examples']} (loss on response tokens only).</p>
<table><tr><th>model</th><th>loss (per-example mean)</th><th>perplexity</th><th>token accuracy</th></tr>{metric_rows}</table>
<ul><li>Adapter vs base: loss {comparison['adapter_vs_base_loss_change']:+.1%}</li>
<li>Merged ({html.escape(comparison['merge_weights'])} weights) vs adapter: loss {comparison['merged_vs_adapter_loss_change']:+.2%}</li></ul>
<img alt="held-out loss by model" src="data:image/png;base64,{plot}">
<h2>Samples</h2>{sample_blocks}</body></html>
"""


def write_report(result: EvaluationResult, out_dir: Path, merge_weights: str, title: str, prompts=(),
                 metric: str = "loss") -> dict:
    """Write metrics.json, examples.parquet, samples.json, report.md, report.html and the plot; return the metrics document."""
    import pandas as pd

    document = metrics_document(result, merge_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat([scores.assign(model=name) for name, scores in result.per_example.items()],
              ignore_index=True).to_parquet(out_dir / EXAMPLES_FILE, index=False)
    extremes = extreme_examples(result, list(prompts), metric) if len(prompts) else []
    (out_dir / "metrics.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    (out_dir / "samples.json").write_text(json.dumps(result.samples, indent=2, ensure_ascii=False))
    losses = {name: document[name]["loss"] for name in document if name != "comparison"}
    plot = bar_chart_png(losses, "held-out loss", "loss by model")
    (out_dir / "loss_by_model.png").write_bytes(plot)
    (out_dir / "report.md").write_text(report_markdown(document, result.samples, title, extremes), encoding="utf-8")
    (out_dir / "report.html").write_text(report_html(document, result.samples, title, plot), encoding="utf-8")
    return document
