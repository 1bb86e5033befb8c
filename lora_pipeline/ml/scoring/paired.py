"""How sure a comparison is: bootstrap intervals of means and of paired differences. numpy only.

Two models scored on the same examples are compared example by example (paired): each example's
own difficulty cancels out of the difference, so the interval is much narrower than comparing two
separate means. The interval comes from resampling examples (percentile bootstrap), and a model is
called better only when the whole interval clears a margin the user chose in advance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with the low and high ends of its confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        """{"value": value, "ci95": [low, high]}, plain floats for metadata and JSON."""
        return {"value": self.value, "ci95": [self.low, self.high]}


def mean_interval(values, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """The mean of `values` with a percentile bootstrap interval; one value gives a zero-width interval."""
    values = _as_finite_vector(values, "values")
    if len(values) == 0:
        raise ValueError("no values to take the mean of")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    mean = float(values.mean())
    if len(values) == 1:
        return Interval(mean, mean, mean)
    rng = np.random.Generator(np.random.PCG64(seed))
    # One (resamples, n) index matrix: every resample in a single vectorised step.
    indices = rng.integers(0, len(values), size=(resamples, len(values)))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values[indices].mean(axis=1), [tail, 100 - tail])
    # Clamped because float rounding can put a percentile a hair outside a constant sample's mean.
    return Interval(mean, float(min(low, mean)), float(max(high, mean)))


def _as_finite_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one number per example, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite scores at positions {np.flatnonzero(~np.isfinite(array))[:10].tolist()}")
    return array


@dataclass(frozen=True)
class PairedComparison:
    """candidate - reference on the same examples: mean difference with its interval, and wins/ties/losses."""

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
        """"better" / "worse" only when the whole interval is past the margin that way, else "within noise"."""
        # Turned into "gain" so that a lower loss reads as a positive gain, like a higher score.
        if self.higher_is_better:
            gain_low, gain_high = self.difference.low, self.difference.high
        else:
            gain_low, gain_high = -self.difference.high, -self.difference.low
        if gain_low > margin:
            return "better"
        if gain_high < -margin:
            return "worse"
        return "within noise"

    def sentence(self, margin: float) -> str:
        """One plain-English sentence with the difference, its interval, the counts and what to make of it."""
        verdict = self.verdict(margin)
        if verdict == "better":
            head = f"{self.candidate} beats {self.reference} on {self.metric}"
            ending = f"better by more than the {margin:g} margin."
        elif verdict == "worse":
            head = f"{self.candidate} trails {self.reference} on {self.metric}"
            ending = f"worse by more than the {margin:g} margin."
        else:
            head = f"{self.candidate} and {self.reference} differ on {self.metric}"
            ending = "within noise, not a difference you can rely on."
        direction = "" if self.higher_is_better else ", lower is better"
        diff = self.difference
        decimals = _decimals_for(diff.high - diff.low)
        value, low, high = (f"{number:+.{decimals}f}" for number in (diff.value, diff.low, diff.high))
        return (f"{head} by {value} (95% CI {low} to {high}{direction}; "
                f"{self.wins} wins, {self.ties} ties, {self.losses} losses over {self.examples} examples): {ending}")

    def as_dict(self, margin: float) -> dict:
        """Every field, the difference as {"value", "ci95"}, the margin and the verdict: plain JSON values."""
        return {
            "metric": self.metric,
            "candidate": self.candidate,
            "reference": self.reference,
            "candidate_mean": self.candidate_mean,
            "reference_mean": self.reference_mean,
            "difference": self.difference.as_dict(),
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "examples": self.examples,
            "higher_is_better": self.higher_is_better,
            "margin": margin,
            "verdict": self.verdict(margin),
        }


def _decimals_for(width: float) -> int:
    # Two significant digits of the interval's width: more digits would be noise, fewer would hide it.
    if width <= 0:
        return 2
    return int(min(6, max(2, 1 - math.floor(math.log10(width)))))


def paired_bootstrap(
    metric: str,
    candidate: str,
    reference: str,
    candidate_values,
    reference_values,
    higher_is_better: bool = True,
    resamples: int = 2000,
    seed: int = 0,
    tie_tolerance: float = 1e-9,
) -> PairedComparison:
    """Compare two models scored on the same examples, in the same order.

    The difference is candidate - reference per example; its mean gets a bootstrap interval from
    resampling examples. A win is an example where the candidate is better by more than
    `tie_tolerance` (lower for a lower-is-better metric such as loss), a loss the opposite, else a tie.
    """
    candidate_array = _as_finite_vector(candidate_values, f"{candidate} {metric}")
    reference_array = _as_finite_vector(reference_values, f"{reference} {metric}")
    if len(candidate_array) != len(reference_array):
        raise ValueError(f"a paired comparison needs the same examples: {len(candidate_array)} {candidate} values "
                         f"vs {len(reference_array)} {reference} values on {metric}")
    if len(candidate_array) == 0:
        raise ValueError(f"no examples to compare {candidate} and {reference} on {metric}")
    differences = candidate_array - reference_array
    gains = differences if higher_is_better else -differences
    return PairedComparison(
        metric=metric,
        candidate=candidate,
        reference=reference,
        candidate_mean=float(candidate_array.mean()),
        reference_mean=float(reference_array.mean()),
        difference=mean_interval(differences, resamples=resamples, seed=seed),
        wins=int((gains > tie_tolerance).sum()),
        ties=int((np.abs(gains) <= tie_tolerance).sum()),
        losses=int((gains < -tie_tolerance).sum()),
        examples=len(candidate_array),
        higher_is_better=higher_is_better,
    )
