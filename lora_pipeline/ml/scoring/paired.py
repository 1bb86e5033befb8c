"""How sure a comparison is: bootstrap intervals of means and of paired differences. numpy only.

Two models scored on the same examples are compared example by example (paired), which removes
the examples' own difficulty from the noise; the interval comes from resampling examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A value with its 95% interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        """{"value", "ci95": [low, high]}."""
        return {"value": self.value, "ci95": [self.low, self.high]}


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    indices = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[indices].mean(axis=1)


def mean_interval(values, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """The mean with a percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no values to take the mean of")
    mean = float(values.mean())
    if len(values) == 1:
        return Interval(mean, mean, mean)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(_resampled_means(values, resamples, seed), [tail, 100 - tail])
    return Interval(mean, float(low), float(high))


@dataclass(frozen=True)
class PairedComparison:
    """candidate - reference on the same examples: the mean difference with its interval, and wins/ties/losses."""

    metric: str
    candidate: str
    reference: str
    candidate_mean: float
    reference_mean: float
    difference: Interval
    wins: int
    ties: int
    losses: int
    examples: int
    higher_is_better: bool

    def verdict(self, margin: float) -> str:
        """'better' only when the whole interval clears the margin the good way, 'worse' when it is past it the bad way."""
        good_low = self.difference.low if self.higher_is_better else -self.difference.high
        good_high = self.difference.high if self.higher_is_better else -self.difference.low
        if good_low > margin:
            return "better"
        if good_high < -margin:
            return "worse"
        return "within noise"

    def sentence(self, margin: float) -> str:
        """One sentence a reader can act on."""
        verdict = self.verdict(margin)
        verb = {"better": "beats", "worse": "trails", "within noise": "vs"}[verdict]
        counts = f"{self.wins} wins, {self.ties} ties, {self.losses} losses over {self.examples} examples"
        head = (f"{self.candidate} {verb} {self.reference} on {self.metric}: {self.difference.value:+.4f} "
                f"(95% CI {self.difference.low:+.4f} to {self.difference.high:+.4f}; {counts})")
        if verdict == "better":
            return f"{head}: better by more than the {margin:g} margin."
        if verdict == "worse":
            return f"{head}: worse, beyond the {margin:g} margin."
        return f"{head}: within noise, not a difference you can rely on."

    def as_dict(self, margin: float) -> dict:
        """Every field, the interval as {"value", "ci95"}, and the verdict."""
        return {"metric": self.metric, "candidate": self.candidate, "reference": self.reference,
                "candidate_mean": self.candidate_mean, "reference_mean": self.reference_mean,
                "difference": self.difference.as_dict(), "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "examples": self.examples, "higher_is_better": self.higher_is_better,
                "margin": margin, "verdict": self.verdict(margin)}


def paired_bootstrap(metric: str, candidate: str, reference: str, candidate_values, reference_values,
                     higher_is_better: bool = True, resamples: int = 2000, seed: int = 0,
                     tie_tolerance: float = 1e-9) -> PairedComparison:
    """Compare two models example by example: the mean paired difference's bootstrap interval and win/tie/loss counts."""
    a = np.asarray(candidate_values, dtype=np.float64)
    b = np.asarray(reference_values, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same examples: {len(a)} candidate vs {len(b)} reference values")
    differences = a - b
    good = differences if higher_is_better else -differences
    return PairedComparison(
        metric=metric, candidate=candidate, reference=reference, candidate_mean=float(a.mean()),
        reference_mean=float(b.mean()), difference=mean_interval(differences, resamples, seed),
        wins=int((good > tie_tolerance).sum()), ties=int((np.abs(good) <= tie_tolerance).sum()),
        losses=int((good < -tie_tolerance).sum()), examples=len(a), higher_is_better=higher_is_better,
    )
