"""Model cards: huggingface_hub front matter, lineage, and the evaluation's figures once it has run."""

from __future__ import annotations

from types import SimpleNamespace

from huggingface_hub import ModelCard

from conftest import micro_config_data
from lora_pipeline.config.registry import validate_config
from lora_pipeline.ml.report.modelcard import merged_card, with_evaluation

METRICS = {
    "base": {"loss": 7.2185, "perplexity": 1365.1, "token_accuracy": 0.01},
    "adapter": {"loss": 2.5476, "perplexity": 12.78, "token_accuracy": 0.52},
    "merged": {"loss": 2.5480, "perplexity": 12.78, "token_accuracy": 0.52},
    "comparison": {"examples": 64, "adapter_vs_base_loss_change": -0.647, "merged_vs_adapter_loss_change": 0.0002,
                   "merge_weights": "dequantized"},
}


def _merged_card(base_model="acme/base: v2"):
    config = validate_config(micro_config_data(base_model=base_model), "test")
    fidelity = SimpleNamespace(max_relative_logit_difference=1e-6, probe_tokens=100)
    lineage = {"version": "0123456789abcdef", "base_model": base_model, "parents": {}, "hardware": {}}
    return merged_card(config, lineage, "dequantized", "float32", fidelity)


def test_the_front_matter_is_valid_yaml_even_for_awkward_model_names():
    card = ModelCard(_merged_card())
    assert card.data.base_model == "acme/base: v2" and card.data.library_name == "transformers"
    assert "## Lineage" in card.text and "## Evaluation" not in card.text


def test_the_evaluation_goes_into_the_card_once_and_is_replaced_by_a_newer_one():
    evaluated = with_evaluation(_merged_card(), METRICS, "merged", "micro", "data/train.jsonl", "eval_report aaaa")
    card = ModelCard(evaluated)
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results == {"loss": 2.548, "perplexity": 12.78, "accuracy": 0.52}
    assert card.data.model_name == "micro" and card.data.base_model == "acme/base: v2"
    assert card.text.index("## Evaluation") < card.text.index("## Lineage")
    assert "| merged (this model) | 2.5480 |" in card.text and "by eval_report aaaa" in card.text

    newer = {**METRICS, "merged": {"loss": 2.0, "perplexity": 7.39, "token_accuracy": 0.6}}
    again = ModelCard(with_evaluation(evaluated, newer, "merged", "micro", "data/train.jsonl", "eval_report bbbb"))
    assert again.text.count("## Evaluation") == 1 and "eval_report aaaa" not in again.text
    assert {r.metric_type: r.metric_value for r in again.data.eval_results}["loss"] == 2.0
    assert again.text.index("## Evaluation") < again.text.index("## Lineage")


def test_the_adapter_card_reports_the_adapter():
    card = ModelCard(with_evaluation(_merged_card(), METRICS, "adapter", "micro", "data/train.jsonl", "eval_report a"))
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["loss"] == 2.5476
    assert "| adapter (this model) | 2.5476 |" in card.text and "adapter vs base: loss -64.7%" in card.text
