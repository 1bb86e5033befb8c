"""metrics.json and report.md from an evaluation. Dagster-free."""

from __future__ import annotations

import json
from pathlib import Path

from lora_pipeline.ml.evaluate import EvaluationResult
from lora_pipeline.ml.plots import bar_chart_png


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
    if "merged_into_original" in result.metrics:
        document["comparison"]["merged_into_original_vs_adapter_loss_change"] = relative_change(
            result.metrics["merged_into_original"]["loss"], adapter_loss
        )
    return document


def report_markdown(document: dict, samples: list[dict[str, str]], title: str) -> str:
    """A short human-readable report: the table, the deltas and a few answers side by side."""
    models = [name for name in document if name != "comparison"]
    lines = [
        f"# {title}",
        "",
        f"Held-out examples: {document['comparison']['examples']} (loss on response tokens only).",
        "",
        "| model | loss | perplexity | token accuracy |",
        "|---|---|---|---|",
    ]
    for name in models:
        m = document[name]
        lines.append(f"| {name} | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['token_accuracy']:.3f} |")
    comparison = document["comparison"]
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
    lines += ["", "![held-out loss](loss_by_model.png)", "", "## Samples", ""]
    for index, sample in enumerate(samples, start=1):
        lines += [f"### {index}", "", "```", sample["prompt"].rstrip(), "```", ""]
        lines.append(f"- **reference**: {sample['reference'].strip()}")
        for name in models:
            if name in sample:
                lines.append(f"- **{name}**: {sample[name] or '(empty)'}")
        lines.append("")
    return "\n".join(lines)


def write_report(result: EvaluationResult, out_dir: Path, merge_weights: str, title: str) -> dict:
    """Write metrics.json, samples.json, report.md and its plot; return the metrics document."""
    document = metrics_document(result, merge_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    (out_dir / "samples.json").write_text(json.dumps(result.samples, indent=2, ensure_ascii=False))
    losses = {name: document[name]["loss"] for name in document if name != "comparison"}
    (out_dir / "loss_by_model.png").write_bytes(bar_chart_png(losses, "held-out loss", "loss by model"))
    (out_dir / "report.md").write_text(report_markdown(document, result.samples, title))
    return document
