"""Per-example scores of a generated answer against its reference, offline. Dagster-free.

`evaluate.load` fetches metric code from the hub, so the metrics come from their own libraries:
ROUGE-L from rouge-score, chrF from sacrebleu. Every score is in [0, 1].
"""

from __future__ import annotations

import re
import string
import unicodedata

TEXT_METRICS = ("exact_match", "normalized_match", "rouge_l", "chrf")
DEFAULT_TEXT_METRICS = TEXT_METRICS
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORDS = re.compile(r"\w+", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD-style: NFKC, lowercase, no punctuation (Unicode too), no English articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") or ch in string.punctuation else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


class _UnicodeWords:
    """rouge-score's default tokenizer keeps only a-z0-9, so non-Latin answers would all score 0."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def text_scores(predictions: list[str], references: list[str], metrics=DEFAULT_TEXT_METRICS) -> dict[str, list[float]]:
    """One list per metric, one value per example. Two empty strings match perfectly; one empty scores 0."""
    unknown = [name for name in metrics if name not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"unknown text metric(s) {unknown}; known: {list(TEXT_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores: dict[str, list[float]] = {}
    if "exact_match" in metrics:
        scores["exact_match"] = [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]
    if "normalized_match" in metrics:
        scores["normalized_match"] = [float(normalize_answer(p) == normalize_answer(r))
                                      for p, r in zip(predictions, references)]
    if "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeWords())
        scores["rouge_l"] = [_both_empty(p, r) if not (p.strip() and r.strip()) else scorer.score(r, p)["rougeL"].fmeasure
                             for p, r in zip(predictions, references)]
    if "chrf" in metrics:
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        scores["chrf"] = [_both_empty(p, r) if not (p.strip() and r.strip()) else chrf.sentence_score(p, [r]).score / 100
                          for p, r in zip(predictions, references)]
    return scores


def _both_empty(prediction: str, reference: str) -> float:
    return float(not prediction.strip() and not reference.strip())
