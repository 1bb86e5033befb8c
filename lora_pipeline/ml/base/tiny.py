"""The built-in base model: a small random Llama with a BPE tokenizer trained on the data.

It stands in for a hub model where there is no network (tests, CI, a first demo) and is built
deterministically: the same corpus gives byte-identical weights and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
# What the builder makes: 2 is the byte-fallback BPE tokenizer llama.cpp's converter reads (1 was a
# byte-level BPE it refused). Part of the built models' cache key and of every stage version that reads
# base_model, so an upgrade rebuilds built-in bases and redoes what their tokens fed, never mixing the two.
BUILTIN_REVISION = 2


@dataclass(frozen=True)
class TinyLlamaShape:
    """Architecture of a built-in model."""

    hidden_size: int = 256
    layers: int = 4
    vocab_size: int = 4096
    max_positions: int = 1024


BUILTIN_MODELS = {
    "tiny-llama": TinyLlamaShape(),
    # Small enough for unit tests to train in seconds.
    "micro-llama": TinyLlamaShape(hidden_size=64, layers=2, vocab_size=1024, max_positions=512),
}


def builtin_shape(base_model: str) -> TinyLlamaShape:
    """The shape named by a 'builtin:NAME' base model id."""
    name = base_model.removeprefix(BUILTIN_PREFIX)
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        from lora_pipeline.errors import ModelError

        raise ModelError(
            f"base_model {base_model!r}: unknown built-in model; available: "
            + ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)
        ) from None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def shape_config(shape: TinyLlamaShape, vocab_size: int) -> dict:
    """The LlamaConfig fields of a built-in model's architecture (what the memory planner reads too)."""
    from lora_pipeline.ml.base.quantize import CPU_4BIT_BLOCK

    heads = max(1, shape.hidden_size // 64)
    return {
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        # Widths the CPU 4-bit kernel can run (see check_cpu_4bit_widths).
        "intermediate_size": _round_up(shape.hidden_size * 5 // 2, CPU_4BIT_BLOCK),
        "num_hidden_layers": shape.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": False,
    }


# Special tokens first, so BOS, EOS and pad keep ids 0, 1 and 2; the pad is distinct from EOS, so EOS
# stays in the labels and the model learns to stop.
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def _byte_fallback_bpe(corpus: list[str], vocab_size: int):
    """A Llama-style BPE trained on the corpus: words marked with '▁' (Metaspace), and any character the
    merges do not cover spelled as its UTF-8 bytes, <0x00>..<0xFF>, which are all in the vocabulary.

    This is the tokenizer layout llama.cpp's converter reads without a pre-tokenizer hash (its
    LlamaHfVocab path), so the built-in models export to GGUF."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    reserved = len(SPECIAL_TOKENS) + len(byte_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(byte_tokens), len(SPECIAL_TOKENS) + 1),
        special_tokens=list(SPECIAL_TOKENS), show_progress=False,
    )
    # Newlines are pieces of their own: no token spans a line break, so a prompt ending in one (Alpaca's
    # "### Response:\n") ends on a token boundary and the loss mask starts exactly at the answer.
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
    ])
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = pre_tokenizer
    draft.train_from_iterator(corpus, trainer)
    trained = json.loads(draft.to_str())["model"]
    # The byte tokens go right after the specials, then the trained pieces in their order.
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *byte_tokens])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        if token not in vocab and len(vocab) < max(vocab_size, reserved):
            vocab[token] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return tokenizer


def build_tiny_llama(corpus: list[str], out_dir: Path, shape: TinyLlamaShape, seed: int = 0) -> Path:
    """Train a byte-fallback BPE tokenizer on the corpus and save it with a randomly initialised Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = _byte_fallback_bpe(corpus, shape.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        **shape_config(shape, len(fast)),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = fast.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
