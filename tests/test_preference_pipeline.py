"""Preference tuning through the pipeline (issue 27): the config keys, preference rows detected and checked before
any model loads, and, for real on the micro model, DPO started from another model's champion, evaluated against
it on held-out pairs and gated like an SFT candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import SAMPLE_DATA, micro_config_data
from test_cli import _cli
from test_tracking import _client, mlflow_server  # noqa: F401 (a fixture)



def _concise_pairs(folder: Path, rows: int = 240) -> Path:
    """Pairs the micro model can learn within a minute: each sample answer preferred to the same answer said twice
    (stopping where the answer ends generalizes to every held-out prompt)."""
    samples = json.loads(SAMPLE_DATA.read_text())[:rows]
    pairs = [{"prompt": row["instruction"] + (f"\n{row['input']}" if row["input"] else ""), "chosen": row["output"],
              "rejected": f"{row['output']} {row['output']}"} for row in samples]
    path = folder / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


def _dpo_config(tmp_path: Path, source: Path, name: str = "micro-dpo", tracking: dict | None = None,
                **training) -> Path:
    """A micro DPO config starting from model 'micro' (the SFT config of conftest)."""
    data = micro_config_data(
        **({"tracking": tracking} if tracking else {}),
        dataset={"source": str(source), "format": "auto", "eval_fraction": 0.2},
        training={"objective": "dpo", "init_adapter": "micro", "max_steps": 12, "batch_size": 8,
                  "learning_rate": 2e-3, "max_length": 96, "logging_steps": 2, "warmup": 0.0, **training},
        preference={"beta": 0.1},
        eval={"max_examples": 80, "samples": 2, "max_new_tokens": 8},
    )
    data["lora"] = {"r": 8, "alpha": 16}  # the starting adapter's settings are what train; these are ignored
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("training, message", [
    ({"init_adapter": "micro"}, "training.init_adapter starts preference tuning"),
    ({"objective": "dpo"}, "must start from an SFT model trained on it"),
    ({"objective": "dpo", "init_adapter": "micro", "packing": True}, "training.packing does not apply to dpo"),
    ({"objective": "dpo", "init_adapter": "micro", "distributed": {"strategy": "ddp"}}, "dpo trains in one process"),
    ({"objective": "simpo"}, "'training.objective'"),
])
def test_preference_keys_are_checked_with_the_key_named(training, message):
    from lora_pipeline.config.registry import validate_config
    from lora_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate_config(micro_config_data(training=training), "micro.yaml")


def test_preference_rows_are_detected_and_refused_with_the_row_and_field(tmp_path):
    from lora_pipeline.cli.session import check_data_early
    from lora_pipeline.config.registry import validate_config
    from lora_pipeline.errors import ConfigError, DataError

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5."},
            {"prompt": "What is 3 plus 3?", "chosen": "6.", "rejected": {"role": "assistant"}}]
    pairs.write_text("\n".join(json.dumps(row) for row in rows))

    def config(**training):
        return validate_config(micro_config_data(dataset={"source": str(pairs), "format": "auto"},
                                                 training=training), "micro.yaml")

    with pytest.raises(DataError, match=r"pairs.jsonl: line 2: field 'rejected' must be text, a \{role, content\}"):
        check_data_early(config(objective="dpo", init_adapter="sft"))
    rows[1]["rejected"] = "6."
    pairs.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(DataError, match=r"pairs.jsonl: line 2: 'chosen' and 'rejected' are the same answer"):
        check_data_early(config(objective="dpo", init_adapter="sft"))
    with pytest.raises(ConfigError, match="supervised fine-tuning cannot learn from; set training.objective"):
        check_data_early(config())
    # An SFT dataset under a preference objective names what is missing.
    with pytest.raises(ConfigError, match="training.objective dpo trains on preference rows"):
        check_data_early(validate_config(micro_config_data(training={"objective": "dpo", "init_adapter": "sft"}),
                                         "micro.yaml"))


def test_dpo_from_a_champion_beats_it_on_held_out_pairs_and_passes_the_gates(tmp_path, write_config, mlflow_server):
    sft = write_config("micro")
    _cli(["run", str(sft), "--json"], tmp_path, check_rc=0)
    dpo = _dpo_config(tmp_path, _concise_pairs(tmp_path), checkpoint_every=4,
                      tracking={"report_to": ["mlflow"], "tracking_uri": mlflow_server})
    result = _cli(["run", str(dpo), "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assets = summary["assets"]
    # Checkpoints every 4 steps went to the store, and were dropped once the adapter was published.
    assert "checkpoint at step 4: " in result.stderr and "checkpoint at step 8: " in result.stderr
    assert not list((tmp_path / "store" / "micro-dpo" / "trained_adapter" / ".checkpoints").glob("*/*"))
    # The base is the starting champion's, copied; the adapter records which champion it started from.
    base_meta = assets["quantized_base"]["metadata"]
    assert base_meta["init_adapter"].startswith("micro champion ") and "/micro/quantized_base/" in base_meta["copied_from"]
    adapter_dir = Path(assets["trained_adapter"]["uri"])
    lineage = json.loads((adapter_dir / "LINEAGE.json").read_text())
    assert lineage["init_adapter"]["model"] == "micro" and lineage["reference"].startswith("micro champion")
    training = json.loads((adapter_dir / "training_summary.json").read_text())
    margins = training["margin_history"]
    assert 0 <= margins[0] < 0.05 and margins[-1] > 2 * margins[0]  # from the reference, the margins grow
    formatted = Path(assets["formatted_dataset"]["uri"])
    held_out = pd.read_parquet(formatted / "eval.parquet")
    assert not set(held_out["prompt"]) & set(pd.read_parquet(formatted / "train.parquet")["prompt"])
    # Held-out preference accuracy: above the reference's coin beyond its interval, paired per pair.
    metrics = json.loads((Path(assets["eval_report"]["uri"]) / "metrics.json").read_text())
    entry = next(e for e in metrics["comparison"]["paired"]
                 if (e["metric"], e["reference"]) == ("preference_accuracy", "reference"))
    assert entry["difference"]["ci95"][0] > 0 and entry["candidate_mean"] > 0.5
    assert abs(metrics["comparison"]["merged_vs_adapter_loss_change"]) < 0.01
    champion = summary["champion"]
    assert champion["promoted"], champion["gates"]
    assert "on preference_accuracy" in champion["gates"]["better_than_base"]["detail"]
    assert "every hand-off gives the training prompt ids" in champion["gates"]["template_fidelity"]["detail"]
    # One MLflow run: the curves live at their logging steps, the evaluation's figures, the champion alias.
    client = _client(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("micro-dpo").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == assets["trained_adapter"]["metadata"]["mlflow_run_id"]
    curve = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [point.step for point in curve] == [2, 4, 6, 8, 10, 12]
    assert {"train/rewards/margins", "train/rewards/accuracies"} <= set(runs[0].data.metrics)
    assert runs[0].data.metrics["eval/adapter_preference_accuracy"] == pytest.approx(entry["candidate_mean"])
    assert "champion" in client.get_registered_model("micro-dpo").aliases

    # A new champion upstream is new input here: the DPO model's stages are stale.
    configs = {"LORA_PIPELINE_CONFIG_DIR": str(tmp_path / "configs")}
    listing = {row["model"]: row for row in
               json.loads(_cli(["list", "--json"], tmp_path, check_rc=0, env=configs).stdout)}
    assert listing["micro-dpo"]["stale"] == []
    _cli(["run", str(sft), "--json", "--set", "training.seed=2", "--set", "promotion.max_regression=100"], tmp_path,
         check_rc=0)
    listing = {row["model"]: row for row in
               json.loads(_cli(["list", "--json"], tmp_path, check_rc=0, env=configs).stdout)}
    assert "trained_adapter" in listing["micro-dpo"]["stale"]

    # KTO and ORPO on the same pairs, one key changed: trained and evaluated against the starting adapter.
    formatted_uris = set()
    for objective in ("kto", "orpo"):
        other = _cli(["run", str(dpo), "--json", "--select", "+eval_report", "--set", f"training.objective={objective}"],
                     tmp_path, check_rc=0)
        other_assets = json.loads(other.stdout.strip().splitlines()[-1])["assets"]
        trained = json.loads((Path(other_assets["trained_adapter"]["uri"]) / "training_summary.json").read_text())
        assert trained["objective"] == objective and trained["steps"] == 12
        other_metrics = json.loads((Path(other_assets["eval_report"]["uri"]) / "metrics.json").read_text())
        assert other_metrics["objective"] == objective and other_metrics["comparison"]["paired"][0]["metric"] == \
            "preference_accuracy"
        formatted_uris.add(other_assets["formatted_dataset"]["uri"])
    assert len(formatted_uris) == 1  # the formatted pairs are shared across objectives


def test_batched_pair_scores_equal_one_by_one(micro_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.preference.evaluation import answer_logps
    from lora_pipeline.ml.preference.report import answers_logps

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    model = AutoModelForCausalLM.from_pretrained(micro_base).eval()
    texts = [("What is 2 plus 2?", "2 plus 2 is 4."), ("Sort the numbers.", "1, 2, 3, 4, 5, 6, 7"), ("Hi", "Hello")]
    prompts = [tokenizer(prompt)["input_ids"] for prompt, _ in texts]
    answers = [tokenizer(answer, add_special_tokens=False)["input_ids"] for _, answer in texts]
    batched = answers_logps(model, prompts, answers, batch_size=2)
    one_by_one = [answer_logps(model, prompt, answer) for prompt, answer in zip(prompts, answers)]
    assert batched == pytest.approx(one_by_one, abs=1e-4)


# One row of each public preference dataset's layout, as published (only shortened).
PUBLIC_LAYOUTS = {
    "HuggingFaceH4/ultrafeedback_binarized": {
        "prompt": "What is 2 plus 2?",
        "chosen": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."}],
        "rejected": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 5."}],
        "score_chosen": 8.0, "score_rejected": 3.0},
    "trl-lib/ultrafeedback_binarized": {
        "chosen": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."}],
        "rejected": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 5."}]},
    "Anthropic/hh-rlhf": {"chosen": "\n\nHuman: What is 2 plus 2?\n\nAssistant: It is 4.",
                          "rejected": "\n\nHuman: What is 2 plus 2?\n\nAssistant: It is 5."},
    "llamafactory dpo_en_demo (sharegpt)": {
        "conversations": [{"from": "human", "value": "What is 2 plus 2?"}],
        "chosen": {"from": "gpt", "value": "It is 4."}, "rejected": {"from": "gpt", "value": "It is 5."}},
    "llamafactory alpaca ranking": {"instruction": "What is 2 plus 2?", "input": "", "chosen": "It is 4.",
                                    "rejected": "It is 5."},
    "argilla/distilabel-intel-orca-dpo-pairs": {"system": "", "input": "What is 2 plus 2?",
                                                "chosen": "It is 4.", "rejected": "It is 5."},
}


@pytest.mark.parametrize("name", sorted(PUBLIC_LAYOUTS))
def test_public_preference_datasets_format_without_edits(tmp_path, name):
    from lora_pipeline.config.schema import DatasetSettings
    from lora_pipeline.ml.data.raw import load_dataset
    from lora_pipeline.ml.preference.data import pairs_of

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PUBLIC_LAYOUTS[name]) + "\n")
    # Intel's ORCA pairs name their prompt 'input': mapped with dataset.columns, as for SFT data.
    columns = {"prompt": "input"} if name.startswith("argilla") else {}
    loaded = load_dataset(DatasetSettings(source=str(path), columns=columns))
    assert loaded.format == "preference"
    pair, = pairs_of(loaded.frame, loaded.rows.where)
    assert pair.prompt == [{"role": "user", "content": "What is 2 plus 2?"}]
    assert (pair.chosen["content"], pair.rejected["content"]) == ("It is 4.", "It is 5.")


def test_unpaired_kto_rows_format_split_and_score_by_label(micro_base):
    from transformers import AutoTokenizer

    from lora_pipeline.ml.data.templates import resolve_template
    from lora_pipeline.ml.preference.formatted import check_preferences, format_preferences
    from lora_pipeline.ml.preference.report import per_row

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    rows = pd.DataFrame([{"prompt": f"What is {i} plus 1?", "completion": f"{i} plus 1 is {i + 1 + (i % 2)}.",
                          "label": "true" if i % 2 == 0 else "false"} for i in range(40)])
    template = resolve_template("chatml", "messages", None)
    formatted = format_preferences(rows, "kto", lambda i: f"kto.jsonl: line {i + 1}", tokenizer, template, 0.25, 64)
    assert formatted.counts["desirable"] == 20 and formatted.counts["undesirable"] == 20
    assert set(formatted.train.columns) >= {"prompt_ids", "completion_ids", "label", "prompt_messages"}
    outcome = check_preferences("kto", formatted.train, formatted.evaluation, tokenizer.eos_token_id, 0.05,
                                formatted.advice)
    assert outcome.passed, outcome.description
    # Per row: the reward's sign agrees with the label, or not; the reference scores a coin.
    held_out = formatted.evaluation.head(2).assign(label=[True, False])
    reference = pd.DataFrame({"completion_logp": [-5.0, -5.0], "label": [True, False]})
    tuned = pd.DataFrame({"completion_logp": [-4.0, -4.0], "label": [True, False]})
    figures = per_row(tuned, reference, held_out, beta=0.1)
    assert list(figures["preference_accuracy"]) == [1.0, 0.0]
    assert list(per_row(reference, reference, held_out, 0.1)["preference_accuracy"]) == [0.5, 0.5]
