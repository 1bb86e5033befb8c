"""Datasets as users bring them: every source and format, cleaning, templates, loss masks, the split, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lora_pipeline.errors import ConfigError, DataError
from lora_pipeline.ml.data.clean import clean_rows, split_sizes
from lora_pipeline.ml.data.raw import load_dataset, source_request
from lora_pipeline.ml.data.sources import source_version

from conftest import SAMPLE_DATA, SHARED_DATA, dataset_settings, format_rows

ALPACA = [{"instruction": f"Question {i}?", "input": "" if i % 3 else f"context {i}", "output": f"Answer {i}."}
          for i in range(60)]
SHAREGPT = [
    {
        "system": "You are terse.",
        "conversations": [
            {"from": "human", "value": f"What is {i} + {i}?"},
            {"from": "gpt", "value": f"{2 * i}."},
            {"from": "human", "value": "And doubled?"},
            {"from": "gpt", "value": f"{4 * i}."},
        ],
    }
    for i in range(40)
] + [
    {
        "tools": json.dumps([{"name": "weather", "parameters": {"city": {"type": "string"}}}]),
        "conversations": [
            {"from": "human", "value": f"Weather in city {i}?"},
            {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": f"c{i}"}})},
            {"from": "observation", "value": f"{i} degrees"},
            {"from": "gpt", "value": f"It is {i} degrees."},
        ],
    }
    for i in range(20)
]
MESSAGES = [
    {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Name number {i}"}]},
            {"role": "assistant", "content": f"Number {i}."},
        ]
    }
    for i in range(30)
] + [
    {
        "messages": [
            {"role": "user", "content": f"Look up {i}"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": json.dumps({"id": i})}}]},
            {"role": "tool", "content": f"record {i}"},
            {"role": "assistant", "content": f"Found record {i}."},
        ]
    }
    for i in range(30)
]
PROMPT_COMPLETION = [{"prompt": f"Translate {i} to words:", "completion": f" number {i}"} for i in range(60)]
TEXT = [{"text": f"Line {i} of a plain document about topic {i % 7}."} for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_base)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- sources ------------------------------------------------------------------------------------

def test_vectorised_normalisation_matches_python_split_and_lower():
    import pyarrow as pa

    from lora_pipeline.ml.data.clean import normalise

    texts = [" a  b ", "\tA\nB\r\n", "x", "", "   ", "Caf\u00e9\u2003\u2003Bar\x1c", "x\xa0y\x85z"]
    assert normalise(pa.array(texts)).to_pylist() == [" ".join(t.split()).lower() for t in texts]


def test_normalisation_of_plain_ascii_rows_agrees_with_the_full_split_and_join():
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    from lora_pipeline.ml.data.clean import normalise

    # Plain single-spaced ASCII rows take a shortcut; mixed with every other kind, all must agree.
    rng = random.Random(0)
    alphabet = list("abcXYZ  .,!?'~@[`{") + ["\t", "\n", "\r", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u2003",
                                              "\u2028", "\u3000", "\u200b", "\x00", "\x7f", "\u00c9", "\u0130", "\u03a3"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(5000)]
    texts += ["Hello World.", "A  B", " A", "A ", "", None]
    part = pa.array(texts, pa.string())
    split_and_joined = pc.utf8_lower(pc.utf8_trim(pc.binary_join(pc.utf8_split_whitespace(part), " "), " "))
    assert normalise(part).equals(split_and_joined)
    assert normalise(part.slice(7, 900)).equals(split_and_joined.slice(7, 900))
    chunked = pa.chunked_array([part.slice(0, 2000), part.slice(2000, 0), part.slice(2000)])  # as a large Parquet file reads
    assert normalise(chunked).combine_chunks().equals(split_and_joined)
    assert normalise(_sharing_buffers(texts[:-1])).equals(split_and_joined.slice(0, len(texts) - 1))


def _sharing_buffers(texts):
    """The texts as an Arrow array whose offsets do not start at 0: how the chunks of a large Parquet
    column share one data buffer (some kernels, e.g. pyarrow 26's ascii_lower, get these wrong)."""
    import pyarrow as pa

    whole = pa.array(["before"] + texts, pa.string())
    _, offsets, data = whole.buffers()
    return pa.Array.from_buffers(pa.string(), len(texts), [None, offsets.slice(4), data])


def test_content_hashes_are_sha256_of_the_joined_texts_however_the_rows_are_chunked():
    import hashlib

    import pyarrow as pa

    from lora_pipeline.ml.data.clean import content_hashes

    instructions = ["Say hi", "Caf\u00e9  au lait", "", "\u4e2d\u6587 \U0001f600", "Say HI "]
    outputs = ["hi", "ok", "x", "y", "hi"]
    parts = [pa.array(instructions), pa.array(outputs), pa.array([""] * 5)]  # the last, optional part unset
    expected = [int.from_bytes(hashlib.sha256(f"{i}\x1f{o}".encode()).digest()[:8], "big")
                for i, o in zip(instructions, outputs)]
    exact, normalised = content_hashes(parts)
    assert exact.tolist() == expected and normalised[0] == normalised[4] != exact[0]
    chunked = [pa.chunked_array([part.slice(0, 2), part.slice(2)]) for part in parts]
    chunked_exact, chunked_normalised = content_hashes(chunked)
    assert (chunked_exact == exact).all() and (chunked_normalised == normalised).all()
    shared_exact, shared_normalised = content_hashes([_sharing_buffers(part.to_pylist()) for part in parts])
    assert (shared_exact == exact).all() and (shared_normalised == normalised).all()


def test_bundled_sample_is_detected_as_alpaca_with_hundreds_of_rows():
    loaded = load_dataset(dataset_settings())
    assert loaded.format == "alpaca" and loaded.detected
    assert len(loaded.frame) == 640


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_each_file_type_gives_the_same_rows(tmp_path, kind):
    frame = pd.DataFrame(ALPACA)
    path = tmp_path / f"data.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ALPACA))
    elif kind == "jsonl":
        _write_jsonl(path, ALPACA)
    elif kind == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    loaded = load_dataset(dataset_settings(source=str(path)))
    assert loaded.format == "alpaca"
    assert loaded.frame[["instruction", "input", "output"]].astype(str).values.tolist() == frame.values.tolist()


def test_txt_files_give_one_text_row_per_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\nsecond line\n")
    loaded = load_dataset(dataset_settings(source=str(path)))
    assert loaded.format == "text" and list(loaded.frame["text"]) == ["first line", "second line"]


def test_a_folder_and_a_glob_combine_files_and_errors_name_the_file_and_line(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", ALPACA[:30])
    _write_jsonl(folder / "b.jsonl", ALPACA[30:])
    (folder / "README.md").write_text("not data")
    assert len(load_dataset(dataset_settings(source=str(folder))).frame) == 60
    assert len(load_dataset(dataset_settings(source=str(folder / "*.jsonl"))).frame) == 60
    _write_jsonl(folder / "b.jsonl", ALPACA[30:33] + [{"instruction": "x", "output": 5}])
    with pytest.raises(DataError, match=r"b.jsonl: line 4: field 'output' must be a string, found int"):
        load_dataset(dataset_settings(source=str(folder)))


def test_a_saved_datasets_folder_and_its_split_load(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(PROMPT_COMPLETION), "test": Dataset.from_list(TEXT)}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert load_dataset(dataset_settings(source=str(tmp_path / "saved"))).format == "prompt_completion"
    assert load_dataset(dataset_settings(source=str(tmp_path / "saved"), split="test")).format == "text"
    with pytest.raises(DataError, match=r"no split 'validation' \(has train, test\)"):
        load_dataset(dataset_settings(source=str(tmp_path / "saved"), split="validation"))


def test_an_fsspec_url_is_read_through_fsspec():
    import fsspec

    with fsspec.open("memory://datasets/chat.jsonl", "w") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in MESSAGES))
    loaded = load_dataset(dataset_settings(source="memory://datasets/chat.jsonl"))
    assert loaded.format == "messages" and len(loaded.frame) == 60
    assert len(load_dataset(dataset_settings(source="memory://datasets/")).frame) == 60


def test_a_hub_dataset_is_read_offline_from_the_hf_cache(tmp_path, monkeypatch):
    """A dataset downloaded once (here: written into the hub cache layout) loads with the hub offline."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--acme--instructions"
    snapshot = repo / "snapshots" / ("a" * 40)
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    pd.DataFrame(ALPACA).to_parquet(snapshot / "data" / "train-00000-of-00001.parquet", index=False)
    # The variables are read when the libraries are imported; set what they derived from them.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    loaded = load_dataset(dataset_settings(source="hf:acme/instructions"))
    assert loaded.format == "alpaca" and len(loaded.frame) == 60
    assert loaded.source == "hf:acme/instructions[train]"
    with pytest.raises(DataError, match=r"hf:acme/missing: cannot load the hub dataset \(split 'train'\)"):
        load_dataset(dataset_settings(source="hf:acme/missing"))


def test_without_a_network_a_hub_dataset_is_offline_at_once_without_hf_hub_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset and the hub unreachable (an endpoint nothing listens on): the cached snapshot is read,
    and an uncached dataset is refused within seconds, saying why, instead of after the clients' retries."""
    import socket
    import time

    from huggingface_hub import constants

    from lora_pipeline.ml import hub_reach

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cache = tmp_path / "hub"
    snapshot = cache / "datasets--acme--instructions" / "snapshots" / ("b" * 40)
    (snapshot / "data").mkdir(parents=True)
    (cache / "datasets--acme--instructions" / "refs").mkdir()
    (cache / "datasets--acme--instructions" / "refs" / "main").write_text("b" * 40)
    pd.DataFrame(ALPACA).to_parquet(snapshot / "data" / "train-00000-of-00001.parquet", index=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for variable in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(variable, raising=False)  # a direct connection, as without a proxy
    monkeypatch.setattr(hub_reach, "_last", {})
    assert hub_reach.hub_unreachable().startswith(f"cannot reach 127.0.0.1:{port}")
    assert len(load_dataset(dataset_settings(source="hf:acme/instructions")).frame) == 60
    assert source_version(source_request(dataset_settings(source="hf:acme/instructions")))  # the cached commit
    started = time.monotonic()
    with pytest.raises(DataError, match=rf"offline \(cannot reach 127.0.0.1:{port} .*\) and not in the local hub cache; "
                                        r"download it once .* `hf download --repo-type dataset acme/missing`"):
        load_dataset(dataset_settings(source="hf:acme/missing"))
    assert time.monotonic() - started < 10


def test_behind_a_proxy_the_hub_is_reachable_when_the_proxy_is(monkeypatch):
    """Where every connection goes through HTTPS_PROXY, the hub's own host does not answer a direct connection;
    the probe asks the proxy, as the hub client would, and NO_PROXY sends it back to the endpoint."""
    import socket

    from huggingface_hub import constants

    from lora_pipeline.ml import hub_reach

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    proxy_port = listening.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.2:{closed_port}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        monkeypatch.setattr(hub_reach, "_last", {})
        assert hub_reach.hub_unreachable() is None
        monkeypatch.setenv("NO_PROXY", "127.0.0.2")
        monkeypatch.setattr(hub_reach, "_last", {})
        assert hub_reach.hub_unreachable().startswith(f"cannot reach 127.0.0.2:{closed_port}")
    finally:
        listening.close()


def test_column_mapping_renames_other_column_names(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)])
    loaded = load_dataset(dataset_settings(source=str(path), columns={"instruction": "question", "output": "answer"}))
    assert loaded.format == "alpaca" and list(loaded.frame["output"][:2]) == ["a0", "a1"]
    with pytest.raises(DataError, match=r"dataset.columns maps to 'query', which the data does not have \(found question, answer\)"):
        load_dataset(dataset_settings(source=str(path), columns={"instruction": "query"}))


# --- formats and templates ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("rows", "fmt", "template"),
    [(ALPACA, "alpaca", "alpaca"), (SHAREGPT, "sharegpt", "chatml"), (MESSAGES, "messages", "chatml"),
     (PROMPT_COMPLETION, "prompt_completion", "plain"), (TEXT, "text", "plain")],
)
def test_each_format_is_detected_templated_and_ends_in_one_eos(tmp_path, tokenizer, rows, fmt, template):
    path = _write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    formatted = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=2048)
    assert formatted.format == fmt and formatted.template == template and formatted.counts["truncated"] == 0
    for table in (formatted.train, formatted.eval):
        frame = table.to_pandas()
        assert frame["ends_with_eos"].all()
        for ids in frame["input_ids"]:
            assert ids[-1] == tokenizer.eos_token_id and list(ids).count(tokenizer.eos_token_id) == 1
    assert formatted.counts["train_rows"] + formatted.counts["eval_rows"] == len(rows)


def test_alpaca_prompts_and_the_loss_mask_cover_exactly_the_response(tokenizer):
    formatted = format_rows(tokenizer, dataset_settings(max_rows=80), eval_fraction=0.2, max_length=256)
    frame = formatted.train.to_pandas()
    first = frame.iloc[0]
    assert first["prompt"].startswith("### Instruction:\n") and first["prompt"].endswith("### Response:\n")
    for row in range(5):
        ids, mask = np.asarray(frame["input_ids"][row]), np.asarray(frame["loss_mask"][row])
        assert tokenizer.decode(ids[mask == 1]) == frame["completion"][row]  # the answer and its EOS
        assert tokenizer.decode(ids[mask == 0], skip_special_tokens=True) == frame["prompt"][row]
        assert (mask[: frame["prompt_tokens"][row]] == 0).all() and (mask[frame["prompt_tokens"][row]:] == 1).all()


def test_conversations_train_on_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", SHAREGPT)
    formatted = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=2048)
    frame = pd.concat([formatted.train.to_pandas(), formatted.eval.to_pandas()])
    two_turns = frame[frame["text"].str.contains("And doubled")].iloc[0]
    trained = tokenizer.decode(np.asarray(two_turns["input_ids"])[np.asarray(two_turns["loss_mask"]) == 1])
    assert trained.count("<|im_end|>") == 2  # both answers, each through its end-of-turn marker
    assert "What is" not in trained and "And doubled" not in trained and "terse" not in trained
    assert trained.endswith("</s>")
    tool_row = frame[frame["text"].str.contains("<tool_call>")].iloc[0]
    assert '"name": "weather"' in tool_row["text"] and "<|im_start|>tool\n" in tool_row["text"]
    trained_tool = tokenizer.decode(np.asarray(tool_row["input_ids"])[np.asarray(tool_row["loss_mask"]) == 1])
    assert "<tool_call>" in trained_tool and "degrees." in trained_tool and "Weather in city" not in trained_tool
    assert "tool\n" not in trained_tool  # the tool's output is context, not something to learn


@pytest.mark.parametrize(("source", "max_length"), [("alpaca", 28), ("sharegpt", 170)])
def test_small_chunks_and_encode_batches_give_the_same_examples(tmp_path, tokenizer, monkeypatch, source, max_length):
    import pyarrow.parquet as pq

    from lora_pipeline.ml.data import formatted, tokenized

    path = _write_jsonl(tmp_path / "chat.jsonl", SHAREGPT) if source == "sharegpt" else SAMPLE_DATA
    settings = dict(eval_fraction=0.2, max_length=max_length)  # some examples truncated, some left untrained
    whole = format_rows(tokenizer, dataset_settings(source=str(path)), **settings)
    assert whole.counts["truncated"] > 0
    monkeypatch.setattr(formatted, "TOKENIZE_CHUNK_ROWS", 7)
    monkeypatch.setattr(tokenized, "ENCODE_BATCH_ROWS", 3)
    chunked = format_rows(tokenizer, dataset_settings(source=str(path)), **settings)
    assert chunked.train.equals(whole.train) and chunked.eval.equals(whole.eval)
    assert chunked.counts == whole.counts and (chunked.token_lengths == whole.token_lengths).all()
    cleaned = clean_rows(load_dataset(dataset_settings(source=str(path))))
    streamed = formatted.format_dataset(cleaned, tokenizer, formatted.FormatSettings(**settings), folder=tmp_path)
    assert streamed.train is None and streamed.counts == whole.counts
    assert pq.read_table(tmp_path / "train.parquet").equals(whole.train)
    assert pq.read_table(tmp_path / "eval.parquet").equals(whole.eval)


def test_an_error_while_tokenizing_ahead_reaches_the_caller(tmp_path, tokenizer, monkeypatch):
    from lora_pipeline.ml.data import formatted

    monkeypatch.setattr(formatted, "TOKENIZE_CHUNK_ROWS", 10)
    rows = SHAREGPT[:25] + [{"conversations": [{"from": "gpt", "value": "first"}, {"from": "gpt", "value": "again"}]}]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    strict = "{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}" \
             "{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(DataError, match=r"chat.jsonl.*line 26.*roles must alternate"):
        format_rows(tokenizer, dataset_settings(source=str(path)), template=strict, eval_fraction=0.2)


def test_loss_on_every_token_when_responses_only_is_off(tokenizer):
    formatted = format_rows(tokenizer, dataset_settings(max_rows=40), eval_fraction=0.2, loss_on_responses_only=False)
    assert all(np.asarray(mask).all() for mask in formatted.train.column("loss_mask").to_pylist())


def test_the_tokenizers_own_chat_template_wins_and_an_inline_one_can_be_given(tmp_path, micro_base):
    from transformers import AutoTokenizer

    path = _write_jsonl(tmp_path / "chat.jsonl", MESSAGES)
    own = AutoTokenizer.from_pretrained(micro_base)
    own.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    # Neither template renders tool calls: the 30 rows with calls are dropped (counted), never trained without them.
    drop = {"unrenderable": "drop", "max_unrenderable_rate": 0.5}
    formatted = format_rows(own, dataset_settings(source=str(path)), eval_fraction=0.2, **drop)
    assert formatted.template == "tokenizer" and "[user] Name number" in formatted.train.column("text")[0].as_py()
    assert formatted.counts["unrenderable_dropped"] == 30
    inline = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    formatted = format_rows(own, dataset_settings(source=str(path)), eval_fraction=0.2, template=inline, **drop)
    assert formatted.template == "inline" and "<user>Name number" in formatted.train.column("text")[0].as_py()
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        format_rows(own, dataset_settings(source=str(path)), template="vicuna")


def test_a_system_prompt_is_added_where_rows_have_none(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", MESSAGES)
    formatted = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, system_prompt="Be brief.")
    assert formatted.train.column("text")[0].as_py().startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_a_pad_token_distinct_from_eos_is_chosen_when_the_tokenizer_pads_with_eos(micro_base):
    from transformers import AutoTokenizer

    from lora_pipeline.ml.data.formatted import ensure_distinct_pad

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    tokenizer.pad_token = tokenizer.eos_token
    ensure_distinct_pad(tokenizer)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


# --- cleaning and the split -----------------------------------------------------------------------

def test_cleaning_counts_every_step(tmp_path, tokenizer):
    rows = [{"instruction": f"Task {i}", "output": f"Result {i}"} for i in range(50)]
    rows += [{"instruction": "Task 3", "output": "Result 3"}]           # exact duplicate
    rows += [{"instruction": "  task 4 ", "output": "RESULT   4"}]      # case/whitespace duplicate
    rows += [{"instruction": "   ", "output": "x"}, {"instruction": "y", "output": ""}]  # empty
    rows += [{"instruction": "Long " * 5, "output": "word " * 400}]   # over max_length
    path = tmp_path / "messy.json"
    path.write_text(json.dumps(rows))
    truncated = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=64)
    counts = truncated.counts
    assert (counts["rows_in"], counts["empty"], counts["exact_duplicates"], counts["normalized_duplicates"]) == (55, 2, 1, 1)
    assert counts["truncated"] == 1 and counts["too_long_dropped"] == 0
    assert counts["train_rows"] + counts["eval_rows"] == 51
    dropped = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=64, overlong="drop")
    assert dropped.counts["too_long_dropped"] == 1 and dropped.counts["train_rows"] + dropped.counts["eval_rows"] == 50
    rows[-1] = {"instruction": "Long " * 400, "output": "short"}      # the prompt alone fills max_length
    path.write_text(json.dumps(rows))
    no_response = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=64)
    assert no_response.counts["no_trainable_tokens"] == 1


def test_split_is_deterministic_disjoint_and_duplicates_never_straddle_it(tokenizer, tmp_path):
    from lora_pipeline.ml.data.quality import check_disjoint

    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(300)]
    rows += [{"instruction": "Question 7 ", "output": "answer  7"}]  # a normalised duplicate of row 7
    forward, backward = tmp_path / "f.json", tmp_path / "b.json"
    forward.write_text(json.dumps(rows))
    backward.write_text(json.dumps(rows[::-1]))
    first = format_rows(tokenizer, dataset_settings(source=str(forward)), dedupe="none", eval_fraction=0.2)
    second = format_rows(tokenizer, dataset_settings(source=str(backward)), dedupe="none", eval_fraction=0.2)
    assert set(first.eval.column("text").to_pylist()) == set(second.eval.column("text").to_pylist())
    train, evaluation = first.train.to_pandas(), first.eval.to_pandas()
    assert check_disjoint(train, evaluation).passed
    assert 30 < len(evaluation) < 90 and len(train) + len(evaluation) == 301
    sevens = pd.concat([train, evaluation])
    sevens = sevens[sevens["prompt"].str.contains("uestion 7 ?\n", regex=True)]
    assert len(sevens) == 2 and sevens["split_bucket"].nunique() == 1
    leaked = pd.concat([evaluation, train.head(1)])
    assert not check_disjoint(train, leaked).passed


def test_the_formatted_check_catches_missing_eos_and_too_much_truncation(tokenizer):
    from lora_pipeline.ml.data.quality import check_formatted, example_summary

    import pyarrow as pa

    formatted = format_rows(tokenizer, dataset_settings(max_rows=80), eval_fraction=0.2)
    train, evaluation = formatted.train, formatted.eval
    check = lambda t, e, limit: check_formatted(example_summary(t), example_summary(e), limit)  # noqa: E731
    assert check(train, evaluation, 0.05).passed

    def replaced(table, column, values):
        return table.set_column(table.schema.get_field_index(column), column, values)

    no_eos = replaced(train, "ends_with_eos", pa.array([False] + [True] * (len(train) - 1)))
    outcome = check(no_eos, evaluation, 0.05)
    assert not outcome.passed and "train: 1 example(s) fail, first at row 0: ends with exactly one EOS" in outcome.description
    masked = replaced(train, "loss_mask", pa.array([[0] * len(ids) for ids in train.column("input_ids").to_pylist()]))
    assert "has at least one trained token" in check(masked, evaluation, 0.05).description
    long = replaced(train, "truncated", pa.array([True] * len(train)))
    outcome = check(long, evaluation, 0.05)
    assert not outcome.passed and "longer than training.max_length" in outcome.description


def test_split_sizes_agree_with_the_split_and_refuse_an_empty_side(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(200)]))
    cleaned = clean_rows(load_dataset(dataset_settings(source=str(path))))
    formatted = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2)
    assert split_sizes(cleaned, 0.2) == (formatted.counts["train_rows"], formatted.counts["eval_rows"])
    path.write_text(json.dumps([{"instruction": "only", "output": "one"}]))
    with pytest.raises(DataError, match=r"rows.json: 1 rows give"):
        split_sizes(clean_rows(load_dataset(dataset_settings(source=str(path)))), 0.01)


def test_real_world_alpaca_data_loads_and_formats(tokenizer):
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the shared data folder must sit beside the project checkout")
    formatted = format_rows(tokenizer, dataset_settings(source=str(SHARED_DATA)), max_length=512)
    assert formatted.format == "alpaca" and formatted.counts["rows_in"] == 999
    assert formatted.counts["train_rows"] + formatted.counts["eval_rows"] + sum(
        formatted.counts[k] for k in ("empty", "exact_duplicates", "normalized_duplicates", "no_trainable_tokens")
    ) == 999


# --- bad input: one line naming the file, line/row and field ----------------------------------------

@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
         r"bad.json: line 3, column \d+: invalid JSON"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', r"bad.jsonl: line 2, column \d+: invalid JSON"),
        ("empty.json", "  \n", "empty.json: the dataset file is empty"),
        ("empty.jsonl", "", "empty.jsonl: the dataset file is empty"),
        ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "response": "d"}]',
         r"missing.json: row 1: missing field 'output' \(alpaca rows need instruction, output; found instruction, output, response\)"),
        ("columns.jsonl", '{"question": "a", "answer": "b"}\n',
         r"columns.jsonl: cannot tell the format from the columns question, answer \(expected one of alpaca: instruction, output"),
        ("type.json", '[{"instruction": "a", "output": 3}]', r"type.json: row 0: field 'output' must be a string, found int"),
        ("roles.jsonl", '{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}\n',
         r"roles.jsonl: line 1: field 'conversations' turn 1: unknown role 'bot' in 'from'"),
        ("parts.jsonl", '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}\n',
         r"parts.jsonl: line 1: field 'messages' message 0: content part 0: its type is 'image_url': only text and reasoning parts"),
        ("object.json", '[{"instruction": "a", "output": "b"}, 7]', r"object.json: row 1: expected an object, found int"),
        ("blank.json", '[{"instruction": " ", "output": "b"}, {"instruction": "c", "output": ""}]',
         r"blank.json: cleaning removed every row \(2 empty"),
        ("broken.csv", 'instruction,output\n"a,b\n', r"broken.csv: invalid CSV"),
        ("notes.docx", "x", r"notes.docx: unknown file type '.docx'"),
    ],
)
def test_bad_input_is_one_clear_error_naming_file_and_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        clean_rows(load_dataset(dataset_settings(source=str(path))))
    assert "\n" not in str(error.value)


def test_missing_columns_of_a_declared_format_list_expected_and_found(tmp_path):
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"missing column 'completion' \(prompt_completion rows need prompt, completion; optional system; found prompt, answer\)"):
        load_dataset(dataset_settings(source=str(path), format="prompt_completion"))


def test_non_utf8_bytes_and_missing_files_are_named(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "ok", "output": "x"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl: line 2: bytes that are not UTF-8"):
        load_dataset(dataset_settings(source=str(latin)))
    with pytest.raises(DataError, match=r"nope.json: dataset not found"):
        load_dataset(dataset_settings(source=str(tmp_path / "nope.json")))


def test_an_unknown_format_name_is_a_config_error_naming_the_key(tmp_path):
    from lora_pipeline.config.registry import validate_config

    with pytest.raises(ConfigError, match=r"'dataset.format'.*'alpaca', 'sharegpt'"):
        validate_config({"base_model": "builtin:micro-llama", "dataset": {"source": "x.json", "format": "vicuna"}}, "x.yaml")


def test_training_labels_are_minus_100_exactly_off_the_assistant_turns(tmp_path, tokenizer):
    from lora_pipeline.ml.batches import IGNORE_INDEX
    from lora_pipeline.ml.training import training_labels

    path = _write_jsonl(tmp_path / "chat.jsonl", SHAREGPT)
    frame = format_rows(tokenizer, dataset_settings(source=str(path)), eval_fraction=0.2, max_length=2048).train.to_pandas()
    for ids, mask, labels in zip(frame["input_ids"], frame["loss_mask"], training_labels(frame)):
        ids, mask, labels = np.asarray(ids), np.asarray(mask), np.asarray(labels)
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        assert (labels[mask == 1] == ids[mask == 1]).all()
        assert 0 < mask.sum() < len(mask)  # prompts and user turns exist and are excluded


def test_chatml_renders_the_standard_layout_with_tools_and_tool_calls(tokenizer):
    from lora_pipeline.ml.data.templates import CHATML

    chat = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "R"}, {"role": "assistant", "content": "B"},
    ]
    render = lambda messages, **kw: tokenizer.apply_chat_template(messages, chat_template=CHATML, tokenize=False, **kw)  # noqa: E731
    assert render(chat) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n<|im_start|>tool\nR<|im_end|>\n'
        "<|im_start|>assistant\nB<|im_end|>\n"
    )
    assert render(chat[:2], add_generation_prompt=True).endswith("<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert render(chat, tools=[{"name": "f"}]).startswith(
        '<|im_start|>system\nS\n\n# Tools\n<tools>\n{"name": "f"}\n</tools><|im_end|>\n<|im_start|>user\n'
    )


def test_conversation_columns_under_the_other_name_are_recognised(tmp_path):
    turns = [{"messages": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"yo {i}"}]} for i in range(10)]
    loaded = load_dataset(dataset_settings(source=str(_write_jsonl(tmp_path / "lf.jsonl", turns))))
    assert loaded.format == "sharegpt" and "conversations" in loaded.frame.columns
    chats = [{"conversations": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
             for i in range(10)]
    loaded = load_dataset(dataset_settings(source=str(_write_jsonl(tmp_path / "oa.jsonl", chats))))
    assert loaded.format == "messages" and "messages" in loaded.frame.columns
