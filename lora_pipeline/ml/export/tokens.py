"""The GGUF's tokenizer: made to split text as the Hugging Face tokenizer does, and proven to by llama.cpp.

Dagster-free. A GGUF whose weights match the safetensors still answers differently if llama.cpp cuts
the prompt into other tokens than training did. Two things go wrong with llama.cpp's converter:

- BOS/EOS: llama.cpp adds them by the GGUF's tokenizer.ggml.add_bos_token / add_eos_token, and
  falls back to its own default (BOS for every SentencePiece-style vocabulary) when the converter
  wrote none. The flags written here are what the HF tokenizer does, observed, not guessed from files.
- A byte-fallback BPE without a tokenizer.model (the built-in models' tokenizer) goes through the
  converter's LlamaHfVocab path: llama.cpp's SentencePiece tokenizer (tokenizer.ggml.model=llama) with
  every score -1000. That tokenizer merges the adjacent pair whose joined text is the highest-scoring
  vocabulary entry, leftmost on ties; with equal scores it merges left to right, not in BPE's merge
  order ("▁largest." became "▁lar" "ge" "st" "."). Scored by merge rank (the token made by merge r
  scores -r), it replays the BPE merges in their order, exactly so long as two adjacent pieces never
  join into a vocabulary entry that another pair makes (not seen for the built-in vocabularies: 30,000
  random texts glued from their pieces gave BPE's ids; and every export is checked, below).
  llama.cpp's BPE path (tokenizer.ggml.model=gpt2 with merges) cannot be used instead: it never
  prepends the '▁' that the Metaspace pre-tokenizer puts before the first word, so every text would
  start differently.

Then check_tokenization runs llama.cpp's own llama-tokenize over texts (the held-out examples) and
compares its ids with the HF tokenizer's, as inference renders them.

What stays different for the built-in tokenizer, and why: its Metaspace pre-tokenizer puts '▁' before
the first word only (prepend_scheme "first"), not before a text that already starts with a space, nor
after a special token; llama.cpp's SentencePiece tokenizer always prepends one space to the text and
to the text after a special token. So " hi" and "</s>hi" differ by one '▁'. Templated prompts start
with neither, and the check would name any held-out text that did.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline.errors import ModelError

# How many differing texts an error or the metadata spells out, with both token splits.
SHOWN_DIFFERENCES = 3


class TokenizationMismatch(ModelError):
    """llama.cpp splits some text into other tokens than the model's own tokenizer does."""


@dataclass(frozen=True)
class SpecialTokenRule:
    """Which special tokens the HF tokenizer adds around a text it encodes with add_special_tokens=True."""

    add_bos: bool
    add_eos: bool
    bos_token: str | None
    eos_token: str | None


def special_token_rule(tokenizer) -> SpecialTokenRule:
    """What the tokenizer adds, found by encoding a word both ways (its config files may not say, or may
    disagree with its post-processor, which is what runs)."""
    word = "a"
    plain = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    added = list(tokenizer(word, add_special_tokens=True)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return SpecialTokenRule(
        add_bos=bos is not None and added[:1] == [bos] and plain[:1] != [bos],
        add_eos=eos is not None and added[-1:] == [eos] and plain[-1:] != [eos],
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
    )


def converter_tokenizer_config(model_dir: Path, rule: SpecialTokenRule) -> dict:
    """The model's tokenizer_config.json with add_bos_token / add_eos_token set as the tokenizer behaves.

    llama.cpp's converter writes those GGUF keys only when a file names them (newer transformers save
    neither); given to the converter, this makes the keys exist, so repair_vocabulary can set them in place."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {**config, "add_bos_token": rule.add_bos, "add_eos_token": rule.add_eos}


def _merge_ranks(model_dir: Path) -> dict[str, int] | None:
    """Token text -> the rank of the first BPE merge that makes it, for a byte-fallback BPE tokenizer.json
    (the vocabularies the converter hands to llama.cpp's SentencePiece tokenizer); None for any other."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE" or not model.get("merges") or not model.get("byte_fallback"):
        return None
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(model["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks


@functools.cache
def _reader_class():
    import numpy as np
    from gguf import GGUFReader

    class Reader(GGUFReader):
        """The gguf package's reader, parsing over a plain-array view of the file's memory map.

        GGUFReader slices its np.memmap once per value it parses, and numpy's memmap subclass costs microseconds
        a slice: a 262k-token vocabulary (Gemma 3: its tokens and merges) took 17 s to read, 5 s over a plain view
        of the same map. Same bytes, same parser; in mode r+ a value set in place is in the map, saved by flush."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped) -> None:
            self._mapped = mapped
            self._plain = mapped.view(np.ndarray)

        def flush(self) -> None:
            """Write values set in place (mode r+) to the file."""
            self._mapped.flush()

    return Reader


def read_gguf(gguf_file: Path, mode: str = "r"):
    """A gguf.GGUFReader of the file (its fields and tensors, as the gguf package reads them), quick to open for a
    large vocabulary; mode 'r+' to set values in place, then flush()."""
    return _reader_class()(gguf_file, mode=mode)


def _field(reader, key: str):
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def repair_vocabulary(gguf_file: Path, model_dir: Path, rule: SpecialTokenRule, reader=None) -> dict:
    """Make the GGUF's tokenizer split text as the HF tokenizer in model_dir does, editing it in place.

    Sets tokenizer.ggml.add_bos_token / add_eos_token to the rule (the converter wrote both keys from
    converter_tokenizer_config), and for a byte-fallback BPE converted as a SentencePiece vocabulary
    scores every token by the rank of the merge that makes it. Only fixed-size values change, so a
    model of any size is edited without being copied. Returns what it set. reader: the file opened with
    read_gguf(gguf_file, "r+") if the caller reads it on (a large vocabulary takes seconds to parse)."""
    import numpy as np

    reader = reader if reader is not None else read_gguf(gguf_file, mode="r+")
    done: dict = {}
    for key, value in (("tokenizer.ggml.add_bos_token", rule.add_bos), ("tokenizer.ggml.add_eos_token", rule.add_eos)):
        found = reader.fields.get(key)
        if found is None:
            raise ModelError(f"{gguf_file.name}: llama.cpp's converter wrote no {key}, so llama.cpp would "
                             "add special tokens by its own default rather than as the model's tokenizer does")
        found.parts[found.data[0]][0] = value
        done[key.removeprefix("tokenizer.ggml.")] = value
    # Only where the converter had no scores to write (no tokenizer.model: it wrote -1000 for every token);
    # a SentencePiece model's own scores are what llama.cpp's tokenizer was written for.
    ranks = None if (model_dir / "tokenizer.model").is_file() else _merge_ranks(model_dir)
    if _field(reader, "tokenizer.ggml.model") == "llama" and ranks is not None:
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        scores = reader.fields["tokenizer.ggml.scores"]
        unmerged = -float(max(ranks.values()) + 1)  # characters, bytes and special tokens: made by no merge
        for index, token in zip(scores.data, tokens):
            scores.parts[index][0] = np.float32(-ranks[token] if token in ranks else unmerged)
        done["scores"] = "BPE merge ranks"
    reader.flush()
    return done


@dataclass(frozen=True)
class TokenDifference:
    """One text the two tokenizers split differently, with both splits (token pieces)."""

    text: str
    hf: tuple[str, ...]
    llama_cpp: tuple[str, ...]

    def describe(self) -> str:
        # The first piece where they part, with a little context: a whole example is hundreds of tokens.
        at = next((i for i, (a, b) in enumerate(zip(self.hf, self.llama_cpp)) if a != b),
                  min(len(self.hf), len(self.llama_cpp)))
        start = max(0, at - 3)
        return (f"{self.text[:120]!r}: from token {at}, HF {list(self.hf[start:at + 6])} but llama.cpp "
                f"{list(self.llama_cpp[start:at + 6])} ({len(self.hf)} vs {len(self.llama_cpp)} tokens)")


@dataclass(frozen=True)
class TokenizationCheck:
    """Whether llama.cpp tokenizes texts as the model's own tokenizer does: how many were checked, how many
    gave the same ids, and the first few that did not."""

    checked: int
    equal: int
    differences: tuple[TokenDifference, ...] = field(default=())

    @property
    def all_equal(self) -> bool:
        return self.checked == self.equal

    @property
    def first_differing_text(self) -> str | None:
        return self.differences[0].text if self.differences else None

    def facts(self, prefix: str = "tokenizer") -> dict:
        """Plain values for an asset's metadata (what a gate reads back)."""
        return {f"{prefix}_texts_checked": self.checked, f"{prefix}_texts_equal": self.equal,
                f"{prefix}_first_differing_text": self.first_differing_text}

    def require_equal(self, gguf_name: str) -> None:
        """Raise TokenizationMismatch naming the first differing texts, with both splits, unless all are equal."""
        if self.all_equal:
            return
        shown = "\n".join(f"  {difference.describe()}" for difference in self.differences)
        raise TokenizationMismatch(
            f"{gguf_name}: llama.cpp splits {self.checked - self.equal} of {self.checked} texts into other tokens "
            f"than the model's tokenizer, so llama.cpp and Ollama would prompt it differently from training:\n{shown}")


def hf_token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The ids the HF tokenizer gives each text, with special tokens added as formatting did (not for a chat
    template, which writes its own BOS; yes for plain and Alpaca text)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def as_llama_cpp_prompt(text: str, rule: SpecialTokenRule) -> str:
    """The text llama.cpp tokenizes for a prompt a template rendered: its chat code drops a BOS (EOS) the
    template wrote at the start (end) when the GGUF adds one itself (common/chat.cpp), so BOS comes once."""
    if rule.add_bos and rule.bos_token and text.startswith(rule.bos_token):
        text = text[len(rule.bos_token):]
    if rule.add_eos and rule.eos_token and text.endswith(rule.eos_token):
        text = text[: -len(rule.eos_token)]
    return text


def gguf_token_pieces(gguf_file: Path) -> list[str]:
    """The GGUF's token list (the pieces llama.cpp's ids stand for)."""
    return read_gguf(gguf_file).fields["tokenizer.ggml.tokens"].contents()


def check_tokenization(gguf_file: Path, model_dir: Path, texts: list[str], add_special_tokens: bool, cache: Path,
                       shown: int = SHOWN_DIFFERENCES, tokenizer=None) -> TokenizationCheck:
    """Tokenize texts with llama.cpp (llama-tokenize on the GGUF) and with the HF tokenizer in model_dir, and
    compare the ids. The HF side adds special tokens as formatting did (add_special_tokens); llama.cpp adds
    them by the GGUF's own flags, as its server and CLI do. tokenizer: model_dir's, if the caller has it loaded."""
    from transformers import AutoTokenizer

    from lora_pipeline.ml.export.llama_cpp import llama_cpp_token_ids

    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_dir)
    rule = special_token_rule(tokenizer)
    expected = hf_token_ids(tokenizer, texts, add_special_tokens)
    got = llama_cpp_token_ids(gguf_file, [as_llama_cpp_prompt(text, rule) for text in texts], cache)
    differing = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    pieces = gguf_token_pieces(gguf_file) if differing else []

    def piece(index: int) -> str:
        return pieces[index] if 0 <= index < len(pieces) else f"<id {index}>"

    differences = tuple(TokenDifference(texts[i], tuple(tokenizer.convert_ids_to_tokens(expected[i])),
                                        tuple(piece(index) for index in got[i])) for i in differing[:shown])
    return TokenizationCheck(checked=len(texts), equal=len(texts) - len(differing), differences=differences)


def adds_special_tokens(template: str) -> bool:
    """Whether formatting tokenized text rendered with this template (its recorded name) with the tokenizer's
    special tokens: yes for Alpaca and plain text, not for a chat template (chatml, the tokenizer's own, an
    inline Jinja one), which writes its own BOS (ml/data/formatted.py)."""
    return template in ("alpaca", "plain")


def held_out_texts(eval_parquet: Path, limit: int = 200) -> list[str]:
    """Texts to check a GGUF's tokenizer on: each held-out example whole (prompt, answer and EOS), then its
    prompt alone (what llama.cpp is asked at inference), distinct, at most limit of them."""
    import pyarrow.parquet as pq

    table = pq.read_table(eval_parquet, columns=["text", "prompt"])
    pairs = zip(table.column("text").to_pylist(), table.column("prompt").to_pylist())
    return list(dict.fromkeys(text for pair in pairs for text in pair if text))[:limit]
