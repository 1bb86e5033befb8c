"""Per-example scores of a generated answer against its reference, offline. Dagster-free.

`evaluate.load` fetches metric code from the hub, so the metrics come from their own libraries:
ROUGE-L from rouge-score, chrF from sacrebleu, both imported only when asked for. Every score is
in [0, 1], one per example, so two models can later be compared example by example (paired.py).

Empty answers: an empty (or whitespace-only) prediction against an empty reference is a perfect
match on every metric (1.0); when only one side is empty, rouge_l and chrf are 0.0 and the two
match metrics are 0.0 as well, because the strings differ.
"""

from __future__ import annotations

import re
import string
import unicodedata

TEXT_METRICS = ("exact_match", "normalized_match", "rouge_l", "chrf")
DEFAULT_TEXT_METRICS = TEXT_METRICS

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Han, kana and CJK compatibility ideographs are written without spaces, so each character is its
# own token; otherwise a whole Chinese sentence would be one "word" and any single differing
# character would score ROUGE-L 0. Everything else is split on runs of Unicode word characters.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKENS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def normalize_answer(text: str) -> str:
    """SQuAD-style: NFKC, lowercase, no punctuation (Unicode too), no English articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    # Removed, not replaced by a space, as SQuAD does: "don't" and "dont" compare equal.
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _is_punctuation(ch: str) -> bool:
    # string.punctuation also holds ASCII symbols ($, +, <, |, ...) that Unicode files under S*, not P*.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


class _UnicodeTokenizer:
    """A rouge-score tokenizer that keeps non-Latin words: the default one keeps only a-z0-9."""

    def tokenize(self, text: str) -> list[str]:
        """Lowercased word tokens; CJK characters one token each."""
        return _TOKENS.findall(text.lower())


def text_scores(
    predictions: list[str], references: list[str], metrics=DEFAULT_TEXT_METRICS
) -> dict[str, list[float]]:
    """One list per requested metric, one value in [0, 1] per example, in the order given.

    exact_match: the stripped strings are equal. normalized_match: `normalize_answer` of both is
    equal. rouge_l: ROUGE-L F-measure over Unicode word tokens. chrf: sentence chrF / 100.
    Two empty strings score 1.0 on every metric; one empty side scores 0.0 (see the module docstring).
    """
    unknown = [name for name in metrics if name not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"unknown text metric(s) {', '.join(map(repr, unknown))}; known: {', '.join(TEXT_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: they must pair up")
    pairs = list(zip(predictions, references))
    scores: dict[str, list[float]] = {}
    if "exact_match" in metrics:
        scores["exact_match"] = [float(p.strip() == r.strip()) for p, r in pairs]
    if "normalized_match" in metrics:
        scores["normalized_match"] = [float(normalize_answer(p) == normalize_answer(r)) for p, r in pairs]
    if "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeTokenizer())
        # rouge-score's argument order is (target, prediction).
        scores["rouge_l"] = [_score_unless_empty(p, r, lambda p, r: scorer.score(r, p)["rougeL"].fmeasure)
                             for p, r in pairs]
    if "chrf" in metrics:
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        scores["chrf"] = [_score_unless_empty(p, r, lambda p, r: chrf.sentence_score(p, [r]).score / 100)
                          for p, r in pairs]
    return scores


def _score_unless_empty(prediction: str, reference: str, score) -> float:
    # Both libraries return 0 for two empty strings, which would punish a model for correctly saying nothing.
    if prediction.strip() and reference.strip():
        return float(score(prediction, reference))
    return float(not prediction.strip() and not reference.strip())
