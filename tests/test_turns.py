"""Conversations as other tools write them: text parts under 'value', and per-turn training flags."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import dataset_settings, format_rows
from lora_pipeline.errors import DataError

# Three rounds; the middle answer is marked context only, a user turn is marked learned.
FLAGGED = [
    {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "First question"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "First answer"}], "loss_weight": 1.0},
        {"role": "user", "content": [{"type": "text", "value": "Second question"}], "loss_weight": 0},
        {"role": "assistant", "content": [{"type": "text", "value": "Second answer"}], "loss_weight": 0.0},
        {"role": "user", "content": [{"type": "text", "text": "Third "}, "question"], "loss_weight": 1},
        {"role": "assistant", "content": "Third answer"},
    ]}
    for _ in range(1)
]


def _rows(count: int, template: dict, field: str = "loss_weight") -> list[dict]:
    """count distinct copies of a conversation (distinct, so deduplication keeps them all)."""
    rows = []
    for index in range(count):
        row = json.loads(json.dumps(template).replace("question", f"question {index}"))
        if field != "loss_weight":
            for message in row["messages"]:
                if "loss_weight" in message:
                    message[field] = message.pop("loss_weight")
        rows.append(row)
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _trained_and_context(tokenizer, frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Per example, the text of its learned tokens and of its other tokens, decoded token by token."""
    result = []
    for ids, mask in zip(frame["input_ids"], frame["loss_mask"]):
        ids, mask = np.asarray(ids), np.asarray(mask)
        result.append((tokenizer.decode(ids[mask == 1]), tokenizer.decode(ids[mask == 0])))
    return result


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_base)


@pytest.mark.parametrize("field", ["loss_weight", "train", "weight", "trainable"])
def test_per_turn_flags_decide_which_turns_are_learned(tmp_path, tokenizer, field):
    rows = _rows(12, FLAGGED[0], field)
    if field == "train":  # booleans, as that layout writes them
        for row in rows:
            for message in row["messages"]:
                if "train" in message:
                    message["train"] = bool(message["train"])
    path = _write(tmp_path / "flagged.jsonl", rows)
    dataset = dataset_settings(source=str(path), turn_flag_field="trainable" if field == "trainable" else None)
    formatted = format_rows(tokenizer, dataset, eval_fraction=0.2, max_length=2048,
                            turn_flag_field=dataset.turn_flag_field)
    frame = pd.concat([formatted.train.to_pandas(), formatted.eval.to_pandas()])
    assert len(frame) == 12
    for trained, context in _trained_and_context(tokenizer, frame):
        assert "First answer" in trained and "Third answer" in trained  # flagged 1, and unflagged assistant
        assert "Second answer" in context and "Second answer" not in trained  # flagged 0: context only
        assert "Third question" in trained  # a user turn flagged 1 is learned
        assert "First question" in context and "Second question" in context


def test_the_learned_tokens_are_exactly_the_flagged_turns_token_by_token(tmp_path, tokenizer):
    from lora_pipeline.ml.batches import IGNORE_INDEX
    from lora_pipeline.ml.training import training_labels

    path = _write(tmp_path / "flagged.jsonl", _rows(10, FLAGGED[0]))
    frame = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=2048).train.to_pandas()
    for text, ids, mask, labels in zip(frame["text"], frame["input_ids"], frame["loss_mask"], training_labels(frame)):
        ids, mask, labels = np.asarray(ids), np.asarray(mask), np.asarray(labels)
        assert (labels[mask == 0] == IGNORE_INDEX).all() and (labels[mask == 1] == ids[mask == 1]).all()
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        assert encoding["input_ids"] == ids.tolist()
        learned_chars = "".join(text[start:end] for (start, end), learned in zip(encoding["offset_mapping"], mask)
                                if learned)
        second = text.index("Second answer")
        assert all(not learned for (start, end), learned in zip(encoding["offset_mapping"], mask)
                   if start <= second < end or second <= start < second + len("Second answer"))
        assert "First answer" in learned_chars and "Third answer" in learned_chars


def test_every_turn_flagged_off_leaves_nothing_to_learn_and_is_dropped_and_counted(tmp_path, tokenizer):
    silent = {"messages": [{"role": "user", "content": "question"},
                           {"role": "assistant", "content": "answer", "train": False}]}
    path = _write(tmp_path / "mixed.jsonl", _rows(10, FLAGGED[0]) + _rows(4, silent))
    formatted = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=2048)
    assert formatted.counts["no_trainable_tokens"] == 4
    assert formatted.counts["train_rows"] + formatted.counts["eval_rows"] == 10


def test_text_parts_under_value_or_text_or_as_strings_are_one_text(tmp_path, tokenizer):
    from lora_pipeline.ml.data.formats import messages_problem, openai_messages

    content = [{"type": "text", "value": "a "}, {"type": "text", "text": "b "}, "c"]
    assert messages_problem([{"role": "user", "content": content}]) is None
    assert openai_messages([{"role": "user", "content": content}])[0]["content"] == "a b c"


def test_a_non_text_part_is_refused_with_its_row_and_type(tmp_path):
    from lora_pipeline.ml.data.raw import load_dataset

    rows = _rows(3, FLAGGED[0])
    rows[1]["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "x.png"}})
    path = _write(tmp_path / "parts.jsonl", rows)
    with pytest.raises(DataError, match=r"parts\.jsonl.*line 2.*message 0: content part 1: its type is 'image_url'"):
        load_dataset(dataset_settings(source=str(path)))


@pytest.mark.parametrize(("value", "where"), [(0.5, "turn"), ("maybe", "turn")])
def test_a_flag_that_is_not_zero_or_one_is_refused_with_its_row_and_field(tmp_path, value, where):
    from lora_pipeline.ml.data.raw import load_dataset

    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}", "weight": 1}]}
            for i in range(3)]
    rows[2]["conversations"][1]["weight"] = value
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"bad\.jsonl.*line 3.*{where} 1: 'weight' must be 0 or 1"):
        load_dataset(dataset_settings(source=str(path)))


def test_a_configured_flag_field_is_checked_when_formatting_with_its_row(tmp_path, tokenizer):
    rows = _rows(6, FLAGGED[0], "trainable")
    rows[4]["messages"][1]["trainable"] = "often"
    path = _write(tmp_path / "custom.jsonl", rows)
    with pytest.raises(DataError, match=r"custom\.jsonl.*line 5.*'trainable' must be 0 or 1"):
        format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=2048,
                    turn_flag_field="trainable")


def test_with_a_configured_flag_field_other_fields_are_not_flags_and_its_values_are_checked_on_reading(tmp_path):
    from lora_pipeline.ml.data.raw import load_dataset

    rows = _rows(6, FLAGGED[0], "trainable")
    for row in rows:
        row["messages"][0]["weight"] = 0.5  # another tool's per-message field, not a training flag here
    path = _write(tmp_path / "custom.jsonl", rows)
    with pytest.raises(DataError, match=r"'weight' must be 0 or 1"):
        load_dataset(dataset_settings(source=str(path)))  # without the setting, 'weight' is read as a flag
    assert len(load_dataset(dataset_settings(source=str(path), turn_flag_field="trainable")).frame) == 6
    rows[4]["messages"][1]["trainable"] = "often"
    path = _write(tmp_path / "custom.jsonl", rows)
    with pytest.raises(DataError, match=r"custom\.jsonl.*line 5.*message 1: 'trainable' must be 0 or 1"):
        load_dataset(dataset_settings(source=str(path), turn_flag_field="trainable"))


def test_the_preview_shows_the_learned_turns(tmp_path, tokenizer):
    path = _write(tmp_path / "flagged.jsonl", _rows(10, FLAGGED[0]))
    formatted = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=2048)
    learned = formatted.preview["learned"].iloc[0]
    parts = learned.split(" | ")
    assert len(parts) == 3  # the first answer, the flagged user turn, the last answer
    assert "First answer" in parts[0] and "Third" in parts[1] and "Third answer" in parts[2]
    assert "Second answer" not in learned


def test_the_demo_config_takes_flagged_conversations_with_value_parts_through_the_data_stages(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    topics = ["rivers", "stars", "bread", "chess", "rain", "bees", "clocks", "maps", "tea", "wind"]
    rows = [
        {"messages": [
            {"role": "user", "content": [{"type": "text", "value": f"Tell me about {topic} number {n}."}]},
            {"role": "assistant", "content": [{"type": "text", "value": f"{topic} {n} are fine."}], "loss_weight": 0},
            {"role": "user", "content": [{"type": "text", "value": "And more?"}]},
            {"role": "assistant", "content": [{"type": "text", "value": f"More {topic}, {n} times."}],
             "loss_weight": 1},
        ]}
        for topic in topics for n in range(8)
    ]
    source = _write(tmp_path / "flagged_chats.jsonl", rows)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    done = subprocess.run(
        [sys.executable, "-m", "lora_pipeline.cli", "run", "configs/tiny-demo.yaml", "--select",
         "raw_dataset,formatted_dataset", "--set", f"dataset.source={source}", "--json"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # the blocking data checks passed
    metadata = json.loads(done.stdout.strip().splitlines()[-1])["assets"]["formatted_dataset"]["metadata"]
    assert metadata["format"] == "messages" and metadata["train_rows"] + metadata["eval_rows"] == len(rows)
    assert "More" in metadata["preview"] and "are fine" not in metadata["preview"].split("learned")[-1]


def test_the_raw_rows_check_reads_the_flag_field_the_rows_were_read_with(tmp_path, write_config, fake_resources):
    import dagster as dg

    from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS

    rows = _rows(6, FLAGGED[0], "trainable")
    for row in rows:
        row["messages"][0]["weight"] = 0.5
    write_config("micro", dataset={"source": str(_write(tmp_path / "custom.jsonl", rows)), "format": "messages",
                                   "turn_flag_field": "trainable", "max_rows": None})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["micro"])
    raw = [asset for asset in PIPELINE_ASSETS if asset.key.path[-1] == "raw_dataset"]
    checks = [check for check in PIPELINE_CHECKS
              if any(key.asset_key == dg.AssetKey("raw_dataset") for key in check.check_keys)]
    result = dg.materialize([*raw, *checks], partition_key="micro", instance=instance, resources=fake_resources)
    assert result.success
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.passed
