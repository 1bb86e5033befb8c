"""The promotion gates: whether a candidate adapter may replace the current champion, and why. Dagster-free.

Each gate is a plain verdict over figures the evaluation already produced (paired comparisons,
the forgetting probe, merge fidelity, the static serving check); the champion stage reports them
as blocking asset checks, `lora-pipeline promote --dry-run` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_pipeline.config.schema import PromotionSettings
    from lora_pipeline.ml.serving import Servability

GATES = ("better_than_base", "no_regression", "forgetting", "merge_fidelity", "servable", "template_fidelity")
GATE_DESCRIPTIONS = {
    "better_than_base": "The candidate beats the base on promotion.metric: the 95% interval of the paired "
    "difference clears promotion.min_improvement. For preference tuning: its reference (the starting adapter, or "
    "the base) on held-out preference accuracy.",
    "no_regression": "The candidate is not worse than the current champion, on the same examples, by more than "
    "promotion.max_regression.",
    "forgetting": "The general-text probe's loss rose by at most promotion.max_forgetting (relative) against the base.",
    "merge_fidelity": "The merged model's held-out loss is within promotion.max_merge_drift (relative) of the adapter's.",
    "servable": "vLLM can serve the adapter as an adapter (rank, no modules_to_save, no DoRA, bias none); required "
    "only when promotion.serving is 'adapter', otherwise an unservable adapter ships merged-only.",
    "template_fidelity": "Every hand-off (transformers from the merged folder and from the adapter folder, the serving "
    "files' chat template) turns held-out conversations into exactly the prompt ids training rendered them as.",
    "recommended": "For a sweep variant: it is the variant the sweep's leaderboard recommends.",
}


@dataclass(frozen=True)
class Gate:
    """One gate's result."""

    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        """{"passed", "detail"}, as the CLI's --json prints it."""
        return {"passed": self.passed, "detail": self.detail}


def paired_entry(document: dict, metric: str, candidate: str, reference: str) -> dict | None:
    """The paired comparison of candidate vs reference on metric in an eval report's metrics.json, if it has one."""
    for entry in document["comparison"].get("paired", []):
        if (entry["metric"], entry["candidate"], entry["reference"]) == (metric, candidate, reference):
            return entry
    return None


def clears_margin(entry: dict, margin: float) -> bool:
    """Whether a paired comparison's whole 95% interval is better than the margin (in the metric's good direction)."""
    low, high = entry["difference"]["ci95"]
    return (low > margin) if entry["higher_is_better"] else (high < -margin)


def better_than_base(document: dict, settings: "PromotionSettings") -> Gate:
    """The adapter's paired difference against the base clears the margin (the config's now, whatever the report used)."""
    entry = paired_entry(document, settings.metric, "adapter", "base")
    if entry is None:
        return Gate("better_than_base", False, f"the evaluation has no paired comparison on {settings.metric}")
    passed = clears_margin(entry, settings.min_improvement)
    low, high = entry["difference"]["ci95"]
    return Gate("better_than_base", passed,
                f"adapter vs base on {settings.metric}: {entry['difference']['value']:+.4f} (95% CI {low:+.4f} to "
                f"{high:+.4f}; {entry['wins']} wins, {entry['ties']} ties, {entry['losses']} losses over "
                f"{entry['examples']} examples): {'clears' if passed else 'does not clear'} the margin of "
                f"{settings.min_improvement:g}")


def better_than_reference(document: dict, settings: "PromotionSettings") -> Gate:
    """A preference model's gate in better_than_base's place: the tuned adapter's preference accuracy against its
    reference (the starting adapter, or the base) clears the margin, paired on the held-out pairs."""
    entry = paired_entry(document, "preference_accuracy", "adapter", "reference")
    if entry is None:
        return Gate("better_than_base", False, "the evaluation has no paired comparison on preference_accuracy")
    passed = clears_margin(entry, settings.min_improvement)
    low, high = entry["difference"]["ci95"]
    return Gate("better_than_base", passed,
                f"adapter vs its reference ({document.get('reference', 'reference')}) on preference_accuracy: "
                f"{entry['candidate_mean']:.3f} vs {entry['reference_mean']:.3f}, {entry['difference']['value']:+.3f} "
                f"(95% CI {low:+.3f} to {high:+.3f}; {entry['wins']} wins, {entry['ties']} ties, {entry['losses']} "
                f"losses over {entry['examples']} pairs): {'clears' if passed else 'does not clear'} the margin of "
                f"{settings.min_improvement:g}")


def no_regression(comparison: dict | None, settings: "PromotionSettings", champion_version: str | None) -> Gate:
    """The candidate is not worse than the champion beyond the tolerance (comparison: candidate vs champion, paired)."""
    if champion_version is None:
        return Gate("no_regression", True, "no champion yet: nothing to regress against")
    if comparison is None:
        return Gate("no_regression", True, f"the candidate is the champion ({champion_version}) already")
    difference = comparison["difference"]["value"]
    worse_by = -difference if comparison["higher_is_better"] else difference
    passed = worse_by <= settings.max_regression
    verdict = ("within" if passed else "beyond") + f" the tolerance of {settings.max_regression:g}"
    return Gate("no_regression", passed, f"against champion {champion_version}: {comparison['sentence']} ({verdict})")


def forgetting(document: dict, settings: "PromotionSettings") -> Gate:
    """The general-text loss did not rise more than allowed."""
    probe = document["comparison"].get("forgetting")
    if probe is None:
        return Gate("forgetting", True, "not measured (eval.forgetting_probe is off)")
    change = probe["relative_change"]
    passed = change <= settings.max_forgetting
    return Gate("forgetting", passed, f"general-text loss {probe['base_loss']:.4f} -> {probe['adapter_loss']:.4f} "
                f"({change:+.1%}; limit +{settings.max_forgetting:.0%})")


def merge_fidelity(document: dict, settings: "PromotionSettings") -> Gate:
    """The merged model scores as its adapter does."""
    drift = document["comparison"]["merged_vs_adapter_loss_change"]
    passed = abs(drift) <= settings.max_merge_drift
    return Gate("merge_fidelity", passed, f"merged vs adapter held-out loss {drift:+.2%} "
                f"(limit ±{settings.max_merge_drift:.0%}, {document['comparison']['merge_weights']} weights)")


def servable(servability: "Servability", settings: "PromotionSettings") -> Gate:
    """Servable as an adapter when the config requires it; otherwise merged-only is acceptable and said."""
    if servability.servable:
        return Gate("servable", True, f"vLLM can serve it as a LoRA adapter (rank {servability.rank})")
    reasons = "; ".join(servability.reasons)
    if settings.serving == "adapter":
        return Gate("servable", False, f"promotion.serving is 'adapter' but vLLM cannot serve it as one: {reasons}")
    return Gate("servable", True, f"merged-only: {reasons}")


def template_fidelity(results: list, not_checked: str | None) -> Gate:
    """Every hand-off produced the training prompt ids on every held-out conversation checked (results:
    fidelity.HandoffFidelity per hand-off; not_checked: why some or all rows were not checked)."""
    if not results or not results[0].checked:
        return Gate("template_fidelity", True, f"not checked: {not_checked or 'no held-out prompt to check'}")
    failed = [result for result in results if not result.passed]
    detail = "; ".join(f"{result.handoff} {result.equal}/{result.checked}"
                       + (f" (first difference: {result.first_difference})" if result.first_difference else "")
                       for result in results)
    verdict = "every hand-off gives the training prompt ids" if not failed else (
        f"{', '.join(result.handoff for result in failed)} put prompts differently from training")
    return Gate("template_fidelity", not failed, f"{verdict}: {detail}" + (f"; {not_checked}" if not_checked else ""))


def recommended(partition: str, recommendation: str | None, sweep: str) -> Gate:
    """A sweep variant is promoted only if its sweep's leaderboard recommends it."""
    if recommendation is None:
        return Gate("recommended", False, f"sweep {sweep!r} has no leaderboard yet: run `lora-pipeline run` on the sweep file")
    return Gate("recommended", recommendation == partition,
                f"the leaderboard of sweep {sweep!r} recommends {recommendation}")


def decide(gates: list[Gate]) -> bool:
    """Promote only when every gate passed."""
    return all(gate.passed for gate in gates)
