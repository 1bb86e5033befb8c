"""Dataset mixtures (dataset.sources): the config, the mixing, per-source metadata and reuse, end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from lora_pipeline.config.registry import validate_config
from lora_pipeline.errors import ConfigError

from conftest import REPO, SAMPLE_DATA, micro_config_data

CHATS = REPO / "lora_pipeline" / "data" / "sample_chats.jsonl"


def _mixture(*sources: dict, **dataset) -> dict:
    """The micro config with dataset.sources in place of its one source."""
    data = micro_config_data()
    data["dataset"] = {"sources": list(sources), "eval_fraction": 0.15, **dataset}
    return data


def _sources_of(tmp_path, instructions_rows: int = 160) -> tuple:
    """Copies of the two bundled datasets that a test may edit: 160 instructions and the conversations."""
    instructions = tmp_path / "data" / "instructions.json"
    instructions.parent.mkdir(parents=True, exist_ok=True)
    instructions.write_text(json.dumps(json.loads(SAMPLE_DATA.read_text())[:instructions_rows]))
    chats = tmp_path / "data" / "chats.jsonl"
    shutil.copy(CHATS, chats)
    return instructions, chats


def test_the_bundled_conversations_are_what_their_generator_writes():
    from lora_pipeline.data.generate_chats import OUTPUT, generate

    rows = [json.loads(line) for line in OUTPUT.read_text(encoding="utf-8").splitlines()]
    assert rows == generate() and len(rows) == 197
    firsts = [row["messages"][1 if row["messages"][0]["role"] == "system" else 0]["content"] for row in rows]
    assert len(set(firsts)) == len(rows)  # no held-out conversation opens as a training one does


# --- the config ---------------------------------------------------------------------------------

def test_a_dataset_has_exactly_one_of_source_and_sources():
    both = micro_config_data(dataset={"source": "a.json", "sources": [{"source": "b.json"}]})
    with pytest.raises(ConfigError, match=r"x.yaml: 'dataset': give dataset.source .* or dataset.sources .*, not both$"):
        validate_config(both, "x.yaml")
    with pytest.raises(ConfigError, match=r"'dataset': missing key 'dataset.source' \(one dataset\), or give dataset.sources"):
        validate_config({"base_model": "builtin:micro-llama", "dataset": {"format": "alpaca"}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"dataset.sources is empty"):
        validate_config(_mixture(), "x.yaml")


@pytest.mark.parametrize(("source", "message"), [
    ({"source": "b.json", "wieght": 2},
     r"unknown key 'dataset.sources\[1\].wieght', did you mean 'weight'\? \(known here: source, name, format,"),
    ({"source": "b.json", "weight": 0}, r"'dataset.sources\[1\].weight': Input should be greater than 0"),
    ({"source": "b.json", "weight": "lots"}, r"'dataset.sources\[1\].weight': Input should be a valid number"),
    ({"source": "b.json", "weight": 2, "train_rows": 10}, r"'dataset.sources\[1\]': b.json: give weight or train_rows, not both"),
    ({"source": "b.json", "format": "alpacca"}, r"'dataset.sources\[1\].format': 'alpacca' is not a row format; use one of auto,"),
    ({"source": "b.json", "format": "preference"}, r"'dataset.sources\[1\]': b.json: preference rows cannot be mixed"),
    ({"source": "b.json", "template": "chatml"}, r"'dataset.sources\[1\]': a source has no template of its own: .* set dataset.template"),
    ({"source": "b.json", "name": "has space"}, r"'dataset.sources\[1\]': name 'has space': use letters, digits"),
    ({"source": "other/a.json"}, r"dataset.sources\[1\] and dataset.sources\[0\] are both named 'a'; .*dataset.sources\[1\].name"),
    ({"name": "b"}, r"missing key 'dataset.sources\[1\].source'"),
])
def test_a_bad_source_is_named_by_its_place_in_the_list(source, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_mixture({"source": "data/a.json"}, source), "x.yaml")


def test_a_preference_objective_takes_one_source():
    data = _mixture({"source": "a.json"}, {"source": "b.json"})
    data["training"] = {**data["training"], "objective": "dpo", "init_adapter": "sft-model"}
    with pytest.raises(ConfigError, match=r"dataset.sources: dpo trains on one dataset of preference rows"):
        validate_config(data, "x.yaml")


def test_each_source_takes_the_dataset_level_keys_it_leaves_out():
    config = validate_config(_mixture(
        {"source": "data/instructions.json", "weight": 0.5},
        {"source": "hf:acme/chat-logs", "name": "chats", "format": "messages", "split": "test", "train_rows": 300,
         "system_prompt": "Be brief.", "max_rows": 1000},
        format="alpaca", columns={"output": "answer"}, max_rows=500, system_prompt="You help.",
    ), "x.yaml")
    first, second = config.dataset.mixture
    assert (first.name, first.key, first.weight, first.share) == ("instructions", "dataset.sources[0]", 0.5, "weight 0.5")
    assert (first.dataset.source, first.dataset.format, dict(first.dataset.columns), first.dataset.max_rows,
            first.dataset.system_prompt, first.dataset.sources) == (
        "data/instructions.json", "alpaca", {"output": "answer"}, 500, "You help.", None)
    assert (second.name, second.train_rows, second.share) == ("chats", 300, "300 rows")
    assert (second.dataset.format, second.dataset.split, second.dataset.system_prompt, second.dataset.max_rows) == (
        "messages", "test", "Be brief.", 1000)
    assert config.dataset.source_label == "data/instructions.json + hf:acme/chat-logs"


def test_a_one_source_config_hashes_and_versions_as_before_mixtures_existed():
    from lora_pipeline.assets.provenance import stage_config
    from lora_pipeline.assets.stages import pipeline

    config = validate_config(micro_config_data(), "x.yaml")
    dumped = config.model_dump(mode="json")
    assert dumped["dataset"]["sources"] is None and dumped["dataset"]["mix_seed"] == 0
    for key in ("sources", "mix_seed"):
        del dumped["dataset"][key]
    before = hashlib.sha256(json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert config.canonical_hash() == before
    for stage in pipeline():
        dataset = stage_config(config, stage).get("dataset")
        assert dataset is None or not {"sources", "mix_seed"} & set(dataset), stage


def test_a_new_weight_redoes_the_mixing_not_the_built_in_base_nor_the_raw_rows():
    """A built-in base's tokenizer learns from every source's rows, whatever their weights: a weight, a train_rows
    or a source's system prompt changes formatted_dataset's settings version, not quantized_base's or raw_dataset's."""
    from lora_pipeline.assets.provenance import stage_settings_versions
    from lora_pipeline.config.registry import load_config_file

    shipped = REPO / "configs" / "tiny-mixture.yaml"
    before = stage_settings_versions(load_config_file(shipped), "source")
    for override in (["dataset.sources[1].weight=3"], ["dataset.sources[1].weight=null", "dataset.sources[1].train_rows=100"],
                     ["dataset.sources[0].system_prompt=Be brief."]):
        after = stage_settings_versions(load_config_file(shipped, override), "source")
        assert after["formatted_dataset"] != before["formatted_dataset"], override
        assert (after["quantized_base"], after["raw_dataset"]) == (before["quantized_base"], before["raw_dataset"]), override
    renamed = stage_settings_versions(load_config_file(shipped, ["dataset.sources[1].max_rows=10"]), "source")
    assert renamed["quantized_base"] != before["quantized_base"]  # fewer rows read: another tokenizer


def test_set_and_a_sweep_reach_one_source_by_its_place(tmp_path):
    from lora_pipeline.config.registry import load_config_file, load_sweep_file

    shipped = REPO / "configs" / "tiny-mixture.yaml"
    config = load_config_file(shipped, ["dataset.sources[1].weight=1", "dataset.sources[0].name=alpaca"])
    assert [(source.name, source.weight) for source in config.dataset.mixture] == [("alpaca", 0.5), ("chats", 1.0)]
    for override, message in (("dataset.sources[2].weight=1", r"dataset.sources\[2\] is not there \(dataset.sources has 2"),
                              ("dataset.sources.weight=1", r"'dataset.sources' is a list; name an entry, e.g. "
                                                           r"dataset.sources\[0\].weight")):
        with pytest.raises(ConfigError, match=message):
            load_config_file(shipped, [override])
    sweep = tmp_path / "mix-sweep.yaml"
    sweep.write_text(shipped.read_text() + "sweep:\n  dataset.sources[1].weight: [1, 3]\n")
    variants = load_sweep_file(sweep)
    assert {key: [s.weight for s in config.dataset.sources] for key, config in variants.items()} == {
        "mix-sweep.weight1": [0.5, 1.0], "mix-sweep.weight3": [0.5, 3.0]}


def test_raw_dataset_reads_which_rows_a_source_gives_and_formatted_dataset_how_they_are_mixed():
    from lora_pipeline.assets.provenance import stage_settings_versions

    def versions(weight: float, source: str = "b.json") -> dict:
        config = validate_config(_mixture({"source": "a.json"}, {"source": source, "weight": weight}), "x.yaml")
        return stage_settings_versions(config, "content")

    halved, doubled, moved = versions(0.5), versions(2.0), versions(0.5, "c.json")
    assert halved["raw_dataset"] == doubled["raw_dataset"] != moved["raw_dataset"]
    assert halved["formatted_dataset"] != doubled["formatted_dataset"]


# --- the mixing ------------------------------------------------------------------------------------

def test_weights_and_train_rows_give_the_expected_counts():
    from lora_pipeline.ml.data.mixing import mix_counts, target_rows

    hashes = np.arange(1, 11, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert [target_rows(558, 0.5, None), target_rows(174, 2, None), target_rows(10, None, 7),
            target_rows(10, None, None), target_rows(3, 0.1, None)] == [279, 348, 7, 10, 0]
    half = mix_counts(hashes, 5, seed=0)
    assert half.sum() == 5 and set(half) == {0, 1}  # without replacement
    assert (mix_counts(hashes, 25, seed=0) >= 2).all() and mix_counts(hashes, 25, seed=0).sum() == 25
    assert (mix_counts(hashes, 10, seed=0) == 1).all()
    # The draw is of the rows' contents: the same rows in another order keep the same rows, another seed others.
    order = np.random.default_rng(1).permutation(10)
    assert (mix_counts(hashes[order], 5, seed=0) == half[order]).all()
    assert any((mix_counts(hashes, 5, seed=seed) != half).any() for seed in range(1, 5))


def test_one_template_for_the_mixture_and_text_sources_plain():
    from lora_pipeline.ml.data.mixture import mixture_templates

    keys = {name: f"dataset.sources[{i}]" for i, name in enumerate(("a", "b", "c"))}
    assert mixture_templates("auto", {"a": "alpaca", "b": "messages"}, keys, None) == (
        {"a": "chatml", "b": "chatml"}, "messages")
    assert mixture_templates("auto", {"a": "alpaca", "b": "prompt_completion"}, keys, "{{ x }}") == (
        {"a": "tokenizer", "b": "tokenizer"}, "messages")
    assert mixture_templates("auto", {"a": "alpaca", "b": "alpaca", "c": "text"}, keys, None) == (
        {"a": "auto", "b": "auto", "c": "plain"}, "alpaca")
    with pytest.raises(ConfigError, match=r"dataset.template 'plain' renders the sources a \(alpaca\), b "
                                          r"\(prompt_completion\) in different prompt formats"):
        mixture_templates("plain", {"a": "alpaca", "b": "prompt_completion"}, keys, None)
    with pytest.raises(ConfigError, match=r"dataset.sources\[1\] \(b, messages rows\): dataset.template: 'alpaca' "
                                          "needs alpaca rows"):
        mixture_templates("alpaca", {"a": "alpaca", "b": "messages"}, keys, None)


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_base)


def _formatted(tmp_path, tokenizer, instructions, chats, seed: int = 0, **chat_share):
    from lora_pipeline.assets.data import format_settings
    from lora_pipeline.ml.data.mixing import format_mixture
    from lora_pipeline.ml.data.mixture import CleanedMixture

    config = validate_config(_mixture({"source": str(instructions), "name": "instructions", "weight": 0.5},
                                      {"source": str(chats), "name": "chats", **chat_share}, mix_seed=seed), "x.yaml")
    rows = CleanedMixture.read(config.dataset.mixture, "normalized")
    sources = rows.to_format(format_settings(config), "auto", tokenizer.chat_template)
    return format_mixture(sources, tokenizer, seed)


def test_a_mixture_is_deterministic_and_held_out_rows_are_never_repeated(tmp_path, tokenizer):
    instructions, chats = _sources_of(tmp_path)
    first = _formatted(tmp_path, tokenizer, instructions, chats, weight=2.5)
    again = _formatted(tmp_path, tokenizer, instructions, chats, weight=2.5)
    assert first.train.equals(again.train) and first.eval.equals(again.eval)

    figures = {figure["name"]: figure for figure in first.sources}
    assert figures["instructions"]["train_rows_after"] == int(figures["instructions"]["train_rows_before"] * 0.5 + 0.5)
    assert figures["chats"]["train_rows_after"] == int(figures["chats"]["train_rows_before"] * 2.5 + 0.5)
    train, held_out = first.train.to_pandas(), first.eval.to_pandas()
    assert train.groupby("source")["tokens"].sum().to_dict() == {
        name: figure["train_tokens_after"] for name, figure in figures.items()}
    assert held_out["source"].value_counts().to_dict() == {name: f["eval_rows"] for name, f in figures.items()}
    assert not held_out["content_hash"].duplicated().any()  # every held-out row once
    assert not set(train["content_hash"]) & set(held_out["content_hash"])  # no copy straddles the split
    copies = train[train["source"] == "chats"]["content_hash"].value_counts()
    assert set(copies) == {2, 3}  # 2.5: every row twice, half of them three times
    assert train["source"].iloc[:40].nunique() == 2  # interleaved, not one source after the other
    assert first.counts["train_rows"] == len(train) and first.counts["eval_rows"] == len(held_out)
    assert first.template == "chatml" and first.format == "messages"

    # A new weight for one source: the other's training rows and the whole eval split stay as they were;
    # another seed draws another half of the down-sampled source.
    reweighted = _formatted(tmp_path, tokenizer, instructions, chats, weight=1)
    assert reweighted.eval.equals(first.eval)

    def rows_of(formatted, source):
        frame = formatted.train.to_pandas()
        return sorted(frame[frame["source"] == source]["content_hash"])

    assert rows_of(reweighted, "instructions") == rows_of(first, "instructions")
    reseeded = _formatted(tmp_path, tokenizer, instructions, chats, seed=1, weight=1)
    assert rows_of(reseeded, "instructions") != rows_of(first, "instructions")
    assert reseeded.eval.equals(first.eval)


def test_train_rows_sets_a_sources_count_and_a_source_without_training_rows_is_named(tmp_path, tokenizer):
    instructions, chats = _sources_of(tmp_path)
    formatted = _formatted(tmp_path, tokenizer, instructions, chats, train_rows=30)
    assert {f["name"]: f["train_rows_after"] for f in formatted.sources}["chats"] == 30

    chats.write_text(chats.read_text().splitlines()[0] + "\n")  # one row: held out or not, nothing to mix
    from lora_pipeline.errors import DataError

    with pytest.raises(DataError, match=r"dataset.sources\[1\] \(chats\):"):
        _formatted(tmp_path, tokenizer, instructions, chats, weight=0.1)


def test_a_text_source_is_rendered_plain_beside_chats_and_its_documents_split(tmp_path, tokenizer):
    from lora_pipeline.assets.data import format_settings
    from lora_pipeline.ml.data.mixing import format_mixture
    from lora_pipeline.ml.data.mixture import CleanedMixture

    _, chats = _sources_of(tmp_path)
    documents = tmp_path / "data" / "documents.jsonl"
    documents.write_text("".join(json.dumps({"text": " ".join(f"word{i}-{j}" for j in range(12 + 40 * (i % 3)))}) + "\n"
                                 for i in range(40)))
    config = validate_config(_mixture({"source": str(chats), "name": "chats"},
                                      {"source": str(documents), "name": "documents"}), "x.yaml")
    rows = CleanedMixture.read(config.dataset.mixture, "normalized")
    formatted = format_mixture(rows.to_format(format_settings(config), "auto", tokenizer.chat_template), tokenizer, 0)
    train = formatted.train.to_pandas()
    text = train[train["source"] == "documents"]
    assert not text["text"].str.contains("<|im_start|>", regex=False).any()  # plain: a document has no prompt
    assert train[train["source"] == "chats"]["text"].str.contains("<|im_start|>", regex=False).all()
    assert text["continued"].any() and not train[train["source"] == "chats"]["continued"].any()
    assert formatted.template == "chatml" and formatted.overlong == "chats: truncate, documents: split"
    assert {f["name"]: f["overlong"] for f in formatted.sources} == {"chats": "truncate", "documents": "split"}


def test_the_held_out_loss_is_broken_down_by_source_when_there_are_several():
    from lora_pipeline.ml.evaluation.pipeline import per_source_of
    from lora_pipeline.ml.report.metrics_report import per_source_table

    frame = pd.DataFrame({"source": ["chats", "instructions", "chats", "instructions", "instructions"]})
    scores = {"base": pd.DataFrame({"loss": [4.0, 6.0, 2.0, 6.0, 9.0]}),
              "adapter": pd.DataFrame({"loss": [1.0, 3.0, 2.0, 3.0, 3.0]})}
    per_source = per_source_of(scores, frame)
    assert per_source == {"chats": {"examples": 2, "base": 3.0, "adapter": 1.5},
                          "instructions": {"examples": 3, "base": 7.0, "adapter": 3.0}}
    assert "| chats | 2 | 3.0000 | 1.5000 | -50.0% |" in per_source_table(per_source)
    assert per_source_of(scores, frame.assign(source="chats")) == {} and per_source_table({}) == []


# --- the assets -------------------------------------------------------------------------------------

def _materialize(fake_resources, instance):
    from lora_pipeline.assets.data import CHECKS, formatted_dataset, raw_dataset

    result = dg.materialize([raw_dataset, formatted_dataset, *CHECKS], partition_key="mix",
                            resources=fake_resources, instance=instance)
    assert result.success
    metadata = {event.asset_key.path[-1]: event.materialization.metadata
                for event in result.get_asset_materialization_events()}
    checks = {check.check_name: check.passed for check in result.get_asset_check_evaluations()}
    return metadata, checks


def test_raw_and_formatted_on_a_mixture_show_each_source_and_reread_only_an_edited_one(
        tmp_path, fake_resources, monkeypatch):
    import lora_pipeline.assets.mixture_data as mixture_data

    instructions, chats = _sources_of(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mix.yaml").write_text(yaml.safe_dump(_mixture(
        {"source": str(instructions), "name": "instructions", "format": "alpaca", "weight": 0.5},
        {"source": str(chats), "name": "chats", "weight": 2})))
    reads = []
    read_source = mixture_data.read_source
    monkeypatch.setattr(mixture_data, "read_source", lambda source: reads.append(source.name) or read_source(source))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["mix"])

    metadata, checks = _materialize(fake_resources, instance)
    assert reads == ["instructions", "chats"]
    assert all(checks.values()) and set(checks) == {"rows_match_format", "examples_are_trainable",
                                                    "train_eval_disjoint"}
    raw, formatted = metadata["raw_dataset"], metadata["formatted_dataset"]
    assert raw["rows"].value == 160 + 197 and raw["reused"].value == "none"
    versions = raw["source_versions"].value
    table = formatted["sources"].value
    assert "| instructions | alpaca" in table and "| chats        | messages | weight 2" in table
    rows = formatted["source_train_rows"].value
    assert formatted["train_rows"].value == sum(rows.values())
    assert formatted["eval_rows"].value == sum(formatted["source_eval_rows"].value.values())
    store = fake_resources["storage"]
    summary = json.loads((store.local_path(store.current("mix", "formatted_dataset")) / "format_summary.json").read_text())
    before = {f["name"]: f for f in summary["sources"]}
    assert rows == {name: f["train_rows_after"] for name, f in before.items()}
    assert before["chats"]["train_rows_after"] == 2 * before["chats"]["train_rows_before"]
    train_before = pd.read_parquet(store.local_path(store.current("mix", "formatted_dataset")) / "train.parquet")

    # An unchanged config and data: nothing is read again.
    reads.clear()
    metadata, _ = _materialize(fake_resources, instance)
    assert reads == [] and metadata["raw_dataset"]["reused"].value == "instructions, chats"

    # One source edited: only it is read again, and only its rows of the mixture change.
    lines = chats.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["messages"][1]["content"] = "An answer that was corrected."
    chats.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    reads.clear()
    metadata, checks = _materialize(fake_resources, instance)
    assert reads == ["chats"] and all(checks.values())
    assert metadata["raw_dataset"]["reused"].value == "instructions"
    now = metadata["raw_dataset"]["source_versions"].value
    assert now["instructions"] == versions["instructions"] and now["chats"] != versions["chats"]
    train_after = pd.read_parquet(store.local_path(store.current("mix", "formatted_dataset")) / "train.parquet")

    def of(frame, source):  # the rows, not the token ids: a built-in base's tokenizer learns from every source
        return frame[frame["source"] == source][["content_hash", "text"]].reset_index(drop=True)

    pd.testing.assert_frame_equal(of(train_after, "instructions"), of(train_before, "instructions"))
    assert not of(train_after, "chats").equals(of(train_before, "chats"))


@pytest.mark.slow
def test_a_mixture_trains_and_eval_report_gives_the_held_out_loss_per_source(tmp_path, fake_resources):
    from lora_pipeline.assets import eval_report, formatted_dataset, merged_model, quantized_base, raw_dataset, trained_adapter

    instructions, chats = _sources_of(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mix.yaml").write_text(yaml.safe_dump(_mixture(
        {"source": str(instructions), "name": "instructions", "format": "alpaca", "weight": 0.5},
        {"source": str(chats), "name": "chats", "weight": 2})))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["mix"])
    result = dg.materialize([raw_dataset, formatted_dataset, quantized_base, trained_adapter, merged_model, eval_report],
                            partition_key="mix", resources=fake_resources, instance=instance)
    assert result.success
    metadata = result.asset_materializations_for_node("eval_report")[0].metadata
    per_source = metadata["adapter_loss_per_source"].value
    assert set(per_source) == {"instructions", "chats"} and all(loss > 0 for loss in per_source.values())
    store = fake_resources["storage"]
    report = store.local_path(store.current("mix", "eval_report"))
    document = json.loads((report / "metrics.json").read_text())["comparison"]["per_source"]
    examples = pd.read_parquet(store.local_path(store.current("mix", "formatted_dataset")) / "eval.parquet")
    assert sum(entry["examples"] for entry in document.values()) == min(len(examples), 16)  # eval.max_examples
    for name, entry in document.items():  # each source's mean is over its own examples
        assert {"base", "adapter", "merged", "examples"} <= set(entry) and entry["adapter"] == pytest.approx(per_source[name], abs=1e-4)
    assert "## Held-out loss per source" in (report / "report.md").read_text()


def test_the_shipped_mixture_runs_its_data_stages_from_the_command_line(tmp_path):
    """The command docs/mixtures.md shows, with the figures it shows."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    done = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", "run", "configs/tiny-mixture.yaml", "--select",
                           "raw_dataset,formatted_dataset", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "source chats (weight 2): 174 -> 348 training rows" in done.stderr  # the log, with --json
    assets = json.loads(done.stdout.strip().splitlines()[-1])["assets"]
    formatted = assets["formatted_dataset"]["metadata"]
    assert (formatted["train_rows"], formatted["eval_rows"], formatted["template"]) == (279 + 348, 82 + 23, "chatml")
    assert "| instructions | alpaca   | weight 0.5 |         640 |" in formatted["sources"]
    assert assets["raw_dataset"]["metadata"]["rows"] == 640 + 197

    # One source read with other settings: only it is read again.
    again = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", "run", "configs/tiny-mixture.yaml", "--select",
                            "raw_dataset,formatted_dataset", "--set", "dataset.sources[1].max_rows=150", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "source chats: 150 messages rows from lora_pipeline/data/sample_chats.jsonl (version" in again.stderr
    raw = json.loads(again.stdout.strip().splitlines()[-1])["assets"]["raw_dataset"]["metadata"]
    assert (raw["read"], raw["reused"], raw["rows"]) == ("chats", "instructions", 640 + 150)


@pytest.mark.parametrize(("family", "answer_turn"), [
    ("qwen3", "<|im_start|>assistant\n"), ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("gemma3", "<start_of_turn>model\n")])
def test_a_mixture_of_alpaca_rows_and_conversations_renders_with_a_real_familys_own_template(
        tmp_path, family, answer_turn):
    """Alpaca rows beside conversations, with a real family's tokenizer: every example of both sources is rendered
    by the family's own chat template, learns only what follows its last answer turn, and ends at the family's EOS."""
    from transformers import AutoTokenizer

    from lora_pipeline.ml.base.families import tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    instructions, chats = _sources_of(tmp_path, instructions_rows=60)
    formatted = _formatted(tmp_path, tokenizer, instructions, chats, weight=1)
    assert formatted.template == "tokenizer" and formatted.format == "messages"
    train = formatted.train.to_pandas()
    assert set(train["source"]) == {"instructions", "chats"}
    for row in train.groupby("source").head(8).itertuples():
        text = tokenizer.decode(row.input_ids)
        assert row.input_ids[-1] == tokenizer.eos_token_id, (row.source, text)
        spans = [[]]  # the learned tokens, one list per contiguous run: each an answer of the conversation
        for token, flag in zip(row.input_ids, row.loss_mask):
            if flag:
                spans[-1].append(token)
            elif spans[-1]:
                spans.append([])
        answers = [tokenizer.decode(span) for span in spans if span]
        assert answers and all(answer_turn + answer in text for answer in answers), (row.source, text, answers)
        assert not any(answer_turn in answer for answer in answers), (row.source, answers)
