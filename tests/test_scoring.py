"""Answer scores on known strings, and paired bootstrap intervals that cover the truth and claim no noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_pipeline.ml.scoring.paired import Interval, mean_interval, paired_bootstrap
from lora_pipeline.ml.scoring.text import DEFAULT_TEXT_METRICS, TEXT_METRICS, normalize_answer, text_scores


def one_score(metric: str, prediction: str, reference: str) -> float:
    return text_scores([prediction], [reference], metrics=(metric,))[metric][0]


# --- text metrics -----------------------------------------------------------------------------


def test_every_metric_by_default_one_value_per_example_in_unit_range():
    scores = text_scores(["Paris", "a blue sky", ""], ["paris", "the sky is blue", "Berlin"])
    assert DEFAULT_TEXT_METRICS == TEXT_METRICS
    assert list(scores) == list(TEXT_METRICS)
    for values in scores.values():
        assert len(values) == 3
        assert all(0.0 <= value <= 1.0 for value in values)


def test_normalized_match_forgives_case_punctuation_and_articles_exact_match_does_not():
    scores = text_scores(["The cat."], ["cat"], metrics=("exact_match", "normalized_match"))
    assert scores == {"exact_match": [0.0], "normalized_match": [1.0]}
    assert one_score("exact_match", "  cat \n", "cat") == 1.0


def test_normalize_answer_handles_unicode_punctuation_and_width():
    assert normalize_answer("  «The»   Ｃａｔ—sat!  ") == "catsat"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # an article inside a word stays
    assert normalize_answer("Привет, мир!") == "привет мир"


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is 5 of 6 tokens each way.
    assert one_score("rouge_l", "the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c": precision 2/4, recall 2/3, F1 = 2PR / (P + R) = 4/7.
    assert one_score("rouge_l", "a b c d", "a c e") == pytest.approx(4 / 7)
    assert one_score("rouge_l", "The Cat", "the cat") == pytest.approx(1.0)


def test_rouge_l_scores_non_latin_text():
    # The default rouge-score tokenizer would drop every character here and score 0.
    assert one_score("rouge_l", "кошка сидит на ковре", "кошка лежит на ковре") == pytest.approx(0.75)
    assert one_score("rouge_l", "我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    assert one_score("rouge_l", "東京", "東京") == pytest.approx(1.0)


def test_chrf_is_one_for_identical_and_about_zero_for_disjoint_strings():
    assert one_score("chrf", "The quick brown fox.", "The quick brown fox.") == pytest.approx(1.0)
    assert one_score("chrf", "xyz qqq", "abc def") < 0.05
    assert 0.0 < one_score("chrf", "the quick brown fox", "the quick red fox") < 1.0


def test_empty_answers_match_only_empty_references():
    both_empty = text_scores([""], ["  "])
    assert all(values == [1.0] for values in both_empty.values())
    one_empty = text_scores([""], ["Paris"])
    assert all(values == [0.0] for values in one_empty.values())
    assert all(values == [0.0] for values in text_scores(["Paris"], [""]).values())


def test_unknown_metric_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="bleurt") as error:
        text_scores(["a"], ["a"], metrics=("rouge_l", "bleurt"))
    assert "chrf" in str(error.value)


def test_predictions_and_references_must_pair_up():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        text_scores(["a", "b"], ["a"])


# --- intervals -------------------------------------------------------------------------------


def test_mean_interval_brackets_the_mean_and_is_reproducible():
    values = np.random.default_rng(1).normal(3.0, 1.0, 50)
    interval = mean_interval(values, seed=7)
    assert interval.low < interval.value < interval.high
    assert interval.value == pytest.approx(values.mean())
    assert mean_interval(values, seed=7) == interval
    assert interval.as_dict() == {"value": interval.value, "ci95": [interval.low, interval.high]}


def test_mean_interval_of_one_value_collapses_and_of_none_fails():
    assert mean_interval([0.4]) == Interval(0.4, 0.4, 0.4)
    assert mean_interval([2.0, 2.0, 2.0]) == Interval(2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, float("nan")])


def test_paired_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    true_difference, experiments, n = 0.05, 300, 60
    covered = 0
    for experiment in range(experiments):
        # Examples differ a lot in difficulty; the pairing must cancel that out.
        difficulty = rng.uniform(0.0, 1.0, n)
        reference = difficulty + rng.normal(0.0, 0.1, n)
        candidate = difficulty + true_difference + rng.normal(0.0, 0.1, n)
        interval = paired_bootstrap("score", "a", "b", candidate, reference, resamples=1000, seed=experiment).difference
        covered += interval.low <= true_difference <= interval.high
    assert 0.90 <= covered / experiments <= 0.99


# --- verdicts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_scores() -> np.ndarray:
    return np.random.default_rng(5).uniform(0.2, 0.8, 200)


def shifted(reference: np.ndarray, shift: float, seed: int = 6) -> np.ndarray:
    """The reference plus a fixed shift and per-example noise of standard deviation 0.1."""
    return reference + shift + np.random.default_rng(seed).normal(0.0, 0.1, len(reference))


def test_a_tiny_shift_inside_the_noise_is_not_called_better(reference_scores):
    comparison = paired_bootstrap("rouge_l", "adapter", "base", shifted(reference_scores, 0.001), reference_scores)
    assert comparison.difference.low < 0 < comparison.difference.high
    assert comparison.verdict(0.0) == "within noise"
    assert comparison.sentence(0.0).endswith("within noise, not a difference you can rely on.")


def test_a_clear_shift_is_better_and_its_reverse_worse(reference_scores):
    better = paired_bootstrap("rouge_l", "adapter", "base", shifted(reference_scores, 0.1), reference_scores)
    assert better.verdict(0.01) == "better"
    assert better.sentence(0.01).startswith("adapter beats base on rouge_l by +0.")
    assert better.sentence(0.01).endswith("better by more than the 0.01 margin.")
    worse = paired_bootstrap("rouge_l", "adapter", "base", shifted(reference_scores, -0.1), reference_scores)
    assert worse.verdict(0.01) == "worse"
    assert "adapter trails base" in worse.sentence(0.01)


def test_a_margin_wider_than_the_true_difference_blocks_better(reference_scores):
    comparison = paired_bootstrap("rouge_l", "adapter", "base", shifted(reference_scores, 0.1), reference_scores)
    assert comparison.verdict(0.0) == "better"
    assert comparison.verdict(0.2) != "better"


def test_lower_loss_is_better(reference_scores):
    base_loss = reference_scores * 3
    lower = paired_bootstrap("loss", "adapter", "base", shifted(base_loss, -0.3), base_loss, higher_is_better=False)
    assert lower.difference.high < 0
    assert lower.verdict(0.01) == "better"
    assert lower.wins > lower.losses
    assert "lower is better" in lower.sentence(0.01)
    higher = paired_bootstrap("loss", "adapter", "base", shifted(base_loss, 0.3), base_loss, higher_is_better=False)
    assert higher.verdict(0.01) == "worse"
    assert higher.wins < higher.losses


def test_wins_ties_and_losses_per_example():
    candidate, reference = [1.0, 0.5, 0.2, 0.7, 0.9], [0.5, 0.5, 0.4, 0.7, 0.1]
    scores = paired_bootstrap("exact_match", "adapter", "base", candidate, reference)
    assert (scores.wins, scores.ties, scores.losses, scores.examples) == (2, 2, 1, 5)
    assert scores.candidate_mean == pytest.approx(0.66)
    assert scores.reference_mean == pytest.approx(0.44)
    assert scores.difference.value == pytest.approx(0.22)
    losses = paired_bootstrap("loss", "adapter", "base", candidate, reference, higher_is_better=False)
    assert (losses.wins, losses.ties, losses.losses) == (1, 2, 2)


def test_differences_within_the_tie_tolerance_are_ties():
    scores = paired_bootstrap("chrf", "a", "b", [0.5 + 1e-12, 0.3], [0.5, 0.3 + 0.05], tie_tolerance=1e-6)
    assert (scores.wins, scores.ties, scores.losses) == (0, 1, 1)


def test_as_dict_is_plain_json_with_the_verdict(reference_scores):
    comparison = paired_bootstrap("rouge_l", "adapter", "base", shifted(reference_scores, 0.1), reference_scores)
    record = json.loads(json.dumps(comparison.as_dict(0.01)))
    assert record["verdict"] == "better"
    assert record["difference"]["ci95"] == [comparison.difference.low, comparison.difference.high]
    assert {"metric", "candidate", "reference", "candidate_mean", "reference_mean", "wins", "ties", "losses",
            "examples", "higher_is_better", "margin"} <= set(record)


def test_paired_values_must_cover_the_same_examples():
    with pytest.raises(ValueError, match=r"3 adapter values vs 2 base values"):
        paired_bootstrap("rouge_l", "adapter", "base", [0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="no examples"):
        paired_bootstrap("rouge_l", "adapter", "base", [], [])
