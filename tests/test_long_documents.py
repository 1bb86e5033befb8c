"""Long documents split into blocks for continued pretraining, and refusals that say what max_length would fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import dataset_settings, format_rows
from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.quality import LengthAdvice, check_formatted, example_summary

REPO = Path(__file__).resolve().parents[1]
WORDS = ["river", "stone", "harbour", "lantern", "meadow", "copper", "orchard", "signal", "winter", "engine"]


def _document(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(WORDS, size=int(rng.integers(5, 12)))).capitalize() + ".")
    return " ".join(sentences)


def _corpus(path: Path, long_docs: int = 6, short_docs: int = 30) -> list[str]:
    texts = [f"Document {i}. " + _document(i, 600) for i in range(long_docs)]
    texts += [f"Note {i}: " + _document(100 + i, 8) for i in range(short_docs)]
    path.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    return texts


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_base)


@pytest.fixture(scope="module")
def bos_tokenizer(micro_base):
    """The micro tokenizer with a post-processor that leads every encoding with BOS, as Llama's does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


def _examples(formatted) -> list[dict]:
    import pyarrow as pa

    return pa.concat_tables([formatted.train, formatted.eval]).to_pylist()


@pytest.mark.parametrize("with_bos", [False, True])
def test_long_documents_are_split_into_blocks_that_lose_no_token(tmp_path, tokenizer, bos_tokenizer, with_bos):
    tokenizer = bos_tokenizer if with_bos else tokenizer
    texts = _corpus(tmp_path / "corpus.jsonl")
    max_length = 128
    formatted = format_rows(tokenizer, dataset_settings(source=str(tmp_path / "corpus.jsonl")),
                            max_length=max_length, eval_fraction=0.2)
    counts = formatted.counts
    assert formatted.overlong == "split"  # the text format's default
    assert counts["split_documents"] == 6 and counts["truncated"] == counts["too_long_dropped"] == 0
    assert counts["tokens_lost_to_max_length"] == 0
    examples = _examples(formatted)
    assert all(example["tokens"] <= max_length for example in examples)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for text in texts[:6]:
        blocks = [e for e in examples if e["content_hash"] == _hash_of(examples, text)]
        assert len(blocks) > 1
        assert len({e["split_bucket"] for e in blocks}) == 1  # one document, one side of the split
        # Each block reads as a document start; only the last ends, once, with EOS.
        assert all((e["input_ids"][0] == bos) == with_bos for e in blocks)
        assert [e["continued"] for e in blocks] == [True] * (len(blocks) - 1) + [False]
        assert [e["ends_with_eos"] for e in blocks] == [False] * (len(blocks) - 1) + [True]
        assert all(eos not in e["input_ids"] for e in blocks[:-1])
        # The blocks, their leading BOS aside, are the document's tokens, all of them, in order.
        whole = tokenizer(text + tokenizer.eos_token)["input_ids"]
        joined = blocks[0]["input_ids"] + [t for e in blocks[1:] for t in e["input_ids"][int(with_bos):]]
        assert joined == whole
        assert "".join(e["text"] for e in blocks) == text + tokenizer.eos_token
        # Every token is learned but the BOS, which nothing predicts.
        assert all(mask == [0] * int(with_bos) + [1] * (len(mask) - int(with_bos))
                   for mask in (e["loss_mask"] for e in blocks))
    summary = example_summary(formatted.train)
    assert summary["continued"].sum() > 0
    assert check_formatted(summary, example_summary(formatted.eval), 0.05).passed


def _hash_of(examples: list[dict], text: str) -> int:
    """The content hash of the document whose first block begins with this text."""
    return next(e["content_hash"] for e in examples if e["prompt"] == "" and text.startswith(e["text"]))


def test_split_blocks_are_the_same_however_the_rows_are_chunked(tmp_path, bos_tokenizer, monkeypatch):
    from lora_pipeline.ml.data import formatted as formatted_module, tokenized

    _corpus(tmp_path / "corpus.jsonl", long_docs=5, short_docs=20)
    settings = dataset_settings(source=str(tmp_path / "corpus.jsonl"))
    whole = _examples(format_rows(bos_tokenizer, settings, max_length=128, eval_fraction=0.2))
    monkeypatch.setattr(formatted_module, "TOKENIZE_CHUNK_ROWS", 7)
    monkeypatch.setattr(tokenized, "ENCODE_BATCH_ROWS", 3)
    chunked = _examples(format_rows(bos_tokenizer, settings, max_length=128, eval_fraction=0.2))
    assert sorted(map(json.dumps, chunked)) == sorted(map(json.dumps, whole))


def test_the_format_decides_the_default_and_split_can_be_asked_for_anywhere(tmp_path, tokenizer):
    from lora_pipeline.ml.data.formatted import overlong_policy

    assert overlong_policy("auto", "text") == "split" and overlong_policy("auto", "alpaca") == "truncate"
    assert overlong_policy("truncate", "text") == "truncate"
    _corpus(tmp_path / "corpus.jsonl")
    truncated = format_rows(tokenizer, dataset_settings(source=str(tmp_path / "corpus.jsonl")), max_length=128,
                            overlong="truncate", eval_fraction=0.2)
    assert truncated.counts["truncated"] == 6 and truncated.counts["split_documents"] == 0
    assert truncated.counts["tokens_lost_to_max_length"] == int(np.sum(np.maximum(truncated.token_lengths - 128, 0)))
    assert "continued" not in truncated.train.column_names  # the files of the other policies are as before
    rows = [{"instruction": f"Summarise part {i}", "output": _document(i, 300)} for i in range(20)]
    (tmp_path / "long.json").write_text(json.dumps(rows))
    split = format_rows(tokenizer, dataset_settings(source=str(tmp_path / "long.json")), max_length=64,
                        overlong="split", eval_fraction=0.2)
    assert split.overlong == "split" and split.counts["split_documents"] == 20
    first_blocks = [e for e in _examples(split) if e["prompt"]]
    assert len(first_blocks) == 20 and all(e["prompt"].startswith("Below is") or "Summarise" in e["prompt"]
                                           for e in first_blocks)


def test_the_auto_policy_is_hashed_as_the_old_default_except_for_text(tmp_path):
    from lora_pipeline.assets.stages import pipeline
    from lora_pipeline.config.schema import ModelConfig

    reads = pipeline()["formatted_dataset"].reads
    alpaca = ModelConfig(base_model="builtin:tiny-llama", dataset={"source": "x.json", "format": "auto"})
    old_spelling = ModelConfig(base_model="builtin:tiny-llama",
                               dataset={"source": "x.json", "format": "auto", "overlong": "truncate"})
    text = ModelConfig(base_model="builtin:tiny-llama", dataset={"source": "x.json", "format": "text"})
    assert reads.of(alpaca) == reads.of(old_spelling)  # upgrading redoes no existing model's data
    assert reads.of(text)["dataset"]["overlong"] == "split"


def test_the_advice_names_the_max_length_that_keeps_95_and_99_percent():
    advice = LengthAdvice.of(np.arange(1, 201), max_length=150)
    assert (advice.keeps_95, advice.keeps_99) == (190, 198)
    assert advice.longer == 50 and advice.tokens_beyond == sum(range(1, 51))
    assert "training.max_length=190 keeps 95%" in advice.suggestion() and "198 keeps 99%" in advice.suggestion()


def test_a_failed_truncation_check_says_what_would_fit_and_what_is_lost(tmp_path, tokenizer):
    rows = [{"instruction": f"Describe item {i}", "output": _document(i, 10 + 4 * i)} for i in range(40)]
    (tmp_path / "growing.json").write_text(json.dumps(rows))
    formatted = format_rows(tokenizer, dataset_settings(source=str(tmp_path / "growing.json")), max_length=64,
                            eval_fraction=0.2)
    advice = LengthAdvice.of(formatted.token_lengths, 64)
    outcome = check_formatted(example_summary(formatted.train), example_summary(formatted.eval), 0.05, 0,
                              advice, formatted.counts["tokens_lost_to_max_length"])
    assert not outcome.passed
    assert f"training.max_length={advice.keeps_95} keeps 95%" in outcome.description
    assert f"{formatted.counts['tokens_lost_to_max_length']:,} tokens lost" in outcome.description
    assert "longer than training.max_length=64 (" in outcome.description
    assert outcome.figures["max_length_keeping_99%"] == advice.keeps_99
    refit = format_rows(tokenizer, dataset_settings(source=str(tmp_path / "growing.json")),
                        max_length=advice.keeps_99, eval_fraction=0.2)
    assert refit.counts["truncated"] <= 0.01 * len(rows)
    # A max_length that leaves no response at all names the same fix.
    with pytest.raises(DataError, match=r"training.max_length=\d+ keeps 95%"):
        format_rows(tokenizer, dataset_settings(source=str(tmp_path / "growing.json")), max_length=8,
                     overlong="drop", eval_fraction=0.2)


def _tool_calls(path: Path, count: int = 80) -> Path:
    """Conversations, a quarter of them calling tools whose schemas are long (many documented parameters)."""
    rows = []
    for i in range(count):
        if i % 4:  # most conversations need no tool
            rows.append({"messages": [{"role": "user", "content": f"Say {WORDS[i % 10]} {i}."},
                                      {"role": "assistant", "content": f"{WORDS[i % 10]} {i}."}]})
            continue
        parameters = {f"{WORDS[j % 10]}_{j}": {"type": "string", "description": _document(1000 * i + j, 6)}
                      for j in range(i % 12)}
        rows.append({
            "tools": json.dumps([{"type": "function", "function": {
                "name": f"lookup_{i}", "description": _document(i, 1 + i % 4),
                "parameters": {"type": "object", "properties": parameters}}}]),
            "messages": [
                {"role": "user", "content": f"Find the {WORDS[i % 10]} record {i}."},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                    "name": f"lookup_{i}", "arguments": json.dumps({f"{WORDS[0]}_0": str(i)})}}]},
                {"role": "tool", "content": f"record {i}: {_document(i + 7, 6)}"},
                {"role": "assistant", "content": f"Record {i} says: {_document(i + 7, 6)}"},
            ],
        })
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    return subprocess.run([sys.executable, "-m", "lora_pipeline.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_validate_refuses_long_tool_schemas_naming_the_max_length_that_fits_and_accepts_it(tmp_path):
    source = _tool_calls(tmp_path / "tools.jsonl")
    refused = _cli(tmp_path, "validate", "configs/tiny-demo.yaml", "--set", f"dataset.source={source}")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = refused.stderr
    assert "longer than training.max_length=128 (0 truncated, 20 dropped: " in message and "tokens lost" in message
    suggested = int(message.split("training.max_length=")[-1].split(" keeps 95%")[0])
    assert suggested > 128
    accepted = _cli(tmp_path, "validate", "configs/tiny-demo.yaml", "--json", "--set", f"dataset.source={source}",
                    "--set", f"training.max_length={suggested}")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    tokens = json.loads(accepted.stdout)["tokens"]
    assert tokens["max_length_keeping_95%"] == suggested and tokens["truncation_rate"] <= 0.05


def test_the_demo_config_takes_a_long_document_corpus_and_long_tool_schemas_through_the_data_stages(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _corpus(corpus, long_docs=12, short_docs=60)
    done = _cli(tmp_path, "run", "configs/tiny-demo.yaml", "--select", "raw_dataset,formatted_dataset",
                "--set", f"dataset.source={corpus}", "--json")
    assert done.returncode == 0, done.stderr[-3000:]  # the blocking data checks passed
    metadata = json.loads(done.stdout.strip().splitlines()[-1])["assets"]["formatted_dataset"]["metadata"]
    assert metadata["format"] == "text" and metadata["overlong"] == "split"
    assert metadata["split_documents"] == 12 and metadata["tokens_lost_to_max_length"] == 0
    assert metadata["train_rows"] + metadata["eval_rows"] > 72

    tools = _tool_calls(tmp_path / "tools.jsonl")
    refused = _cli(tmp_path, "run", "configs/tiny-demo.yaml", "--select", "raw_dataset,formatted_dataset",
                   "--set", f"dataset.source={tools}", "--json")
    assert refused.returncode != 0 and "keeps 95%" in refused.stderr + refused.stdout
    suggested = (refused.stderr + refused.stdout).split("training.max_length=")[-1].split(" keeps 95%")[0]
    done = _cli(tmp_path, "run", "configs/tiny-demo.yaml", "--select", "raw_dataset,formatted_dataset",
                "--set", f"dataset.source={tools}", "--set", f"training.max_length={int(suggested)}", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
