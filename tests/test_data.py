"""Reading, checking, templating and splitting Alpaca data."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data import check_alpaca, format_alpaca, load_alpaca, read_records

from conftest import SAMPLE_DATA, SHARED_DATA


def _frame(rows):
    return check_alpaca(rows, "rows")


def test_bundled_sample_is_valid_alpaca_with_hundreds_of_rows():
    frame = load_alpaca(str(SAMPLE_DATA))
    assert len(frame) >= 300
    assert list(frame.columns) == ["instruction", "input", "output"]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"bad.json: line 3, column \d+: invalid JSON"):
        read_records(str(path))


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        read_records(str(path))


def test_missing_field_names_row_field_and_what_was_found():
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "response": "d"}]
    with pytest.raises(DataError, match=r"row 1: missing field 'output'.*found instruction, output, response"):
        _frame(rows)


def test_wrong_type_is_named():
    with pytest.raises(DataError, match=r"row 0: field 'output' must be a string, found int"):
        _frame([{"instruction": "a", "output": 3}])


def test_empty_and_non_utf8_files_are_refused(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty.json: the dataset file is empty"):
        read_records(str(empty))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(DataError, match=r"latin.json: line 1: bytes that are not UTF-8"):
        read_records(str(latin))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json: dataset file not found"):
        read_records(str(tmp_path / "nope.json"))


def test_eos_is_appended_exactly_once():
    frame = _frame(
        [{"instruction": f"q{i}", "output": f"answer {i}" + ("</s>" if i % 2 else "")} for i in range(40)]
        + [{"instruction": "doubled", "output": "x</s></s>"}]
    )
    splits = format_alpaca(frame, "</s>", 0.2, "rows")
    for table in (splits.train, splits.eval):
        for completion, text in zip(table["completion"], table["text"]):
            assert completion.endswith("</s>") and completion.count("</s>") == 1
            assert text.count("</s>") == 1


def test_prompt_uses_the_alpaca_template_with_and_without_input():
    frame = _frame([{"instruction": "Sort.", "input": "3, 1", "output": "1, 3"}] + [
        {"instruction": f"q{i}", "output": "a"} for i in range(30)
    ])
    splits = format_alpaca(frame, "</s>", 0.3, "rows")
    everything = pd.concat([splits.train, splits.eval])
    with_input = everything[everything["prompt"].str.contains("3, 1")].iloc[0]["prompt"]
    assert with_input == "### Instruction:\nSort.\n\n### Input:\n3, 1\n\n### Response:\n"
    assert "### Input" not in everything[everything["prompt"].str.contains("q0\n")].iloc[0]["prompt"]


def test_split_is_deterministic_disjoint_and_keeps_duplicates_together():
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(300)]
    rows += [{"instruction": "Question 7 ", "output": "answer  7"}]  # a normalised duplicate of row 7
    first = format_alpaca(_frame(rows), "</s>", 0.2, "rows")
    second = format_alpaca(_frame(list(reversed(rows))), "</s>", 0.2, "rows")
    assert set(first.eval["text"]) == set(second.eval["text"])
    assert not set(first.train["text"]) & set(first.eval["text"])
    assert 30 < len(first.eval) < 90
    assert len(first.train) + len(first.eval) == 301
    both = pd.concat([first.train, first.eval])
    row_seven = both[both["prompt"].str.contains("uestion 7 ?\n", regex=True)]
    assert len(row_seven) == 2 and row_seven["split_bucket"].nunique() == 1


def test_a_split_without_eval_rows_is_a_clear_error():
    with pytest.raises(DataError, match=r"1 rows give .* training and .* held-out"):
        format_alpaca(_frame([{"instruction": "only", "output": "one"}]), "</s>", 0.1, "rows")


def test_real_world_alpaca_data_loads_and_formats():
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the shared data folder must sit beside the project checkout")
    frame = load_alpaca(str(SHARED_DATA))
    splits = format_alpaca(frame, "</s>", 0.1, str(SHARED_DATA))
    assert len(frame) == 999
    assert len(splits.train) + len(splits.eval) == 999
    assert json.dumps(list(splits.train["text"][:3]), ensure_ascii=False)


def test_split_sizes_agree_with_the_split_and_refuse_an_empty_side():
    from lora_pipeline.ml.data import split_sizes

    frame = _frame([{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(200)])
    splits = format_alpaca(frame, "</s>", 0.2, "rows")
    assert split_sizes(frame, 0.2, "rows") == (len(splits.train), len(splits.eval))
    with pytest.raises(DataError, match="rows: 1 rows give"):
        split_sizes(frame.head(1), 0.01, "rows")
