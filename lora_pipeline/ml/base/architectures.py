"""Model shapes from config.json: the shipped hub models' fields, reading a model's config, counting parameters.

HUB_ARCHITECTURES holds, for the hub models the shipped configs name, the config.json fields the memory
planner reads (nothing else), copied from the model's config.json as published on the Hugging Face hub;
the comment above each says where the values were read, so memory can be planned offline. Dagster-free,
no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TIED_BY_DEFAULT = {"gpt2", "falcon", "gemma", "gemma2", "gemma3_text"}  # tie_word_embeddings when config.json is silent

HUB_ARCHITECTURES: dict[str, dict] = {
    # configs/llama-3.1-8b-qlora.yaml. config.json of meta-llama/Llama-3.1-8B as re-uploaded with
    # "_name_or_path": "meta-llama/Llama-3.1-8B" at https://huggingface.co/NbAiLab/nb-llama-3.1-8B/blob/main/config.json
    # and https://huggingface.co/lectura/cpt-Llama-3.1-8B-hj-kz/blob/main/config.json (the gated original is
    # bfloat16, as https://huggingface.co/Syed-Hasan-8503/Llama-3.1-8b-BAdam/blob/main/config.json, a copy of
    # meta-llama/Meta-Llama-3.1-8B, records).
    "meta-llama/Llama-3.1-8B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_hidden_layers": 32,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    },
    # configs/mistral-7b-qlora.yaml. https://huggingface.co/unsloth/mistral-7b-v0.3/blob/058e6597d74073e59a1c087ef221d0a7b6bb3889/config.json
    # ("_name_or_path": "mistralai/Mistral-7B-v0.3"); the same shape as mistralai's own
    # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/c170c708c41dac9275d15a8fff4eca08d52bab71/config.json
    "mistralai/Mistral-7B-v0.3": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "vocab_size": 32768,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # configs/qwen2.5-7b-lora.yaml. https://huggingface.co/AmberYifan/Qwen2.5-7B-gen-dpo-10k/blob/06301e9ceb9578f3c5ce6a4244af885d85f275ad/config.json
    # ("_name_or_path": "Qwen/Qwen2.5-7B"), identical shape to https://huggingface.co/Time-Reasoning/qwen2.5-7B-rat/blob/main/config.json.
    # Qwen2 attention always has q/k/v biases (transformers models/qwen2/modeling_qwen2.py).
    "Qwen/Qwen2.5-7B": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "num_hidden_layers": 28,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # configs/phi-3-mini-lora.yaml. https://huggingface.co/Alignment-Lab-AI/idfkphi4kiguess/blob/main/config.json
    # ("Duplicate from microsoft/Phi-3-mini-4k-instruct"); transformers' Phi3Config defaults
    # (models/phi3/configuration_phi3.py, checkpoint="microsoft/Phi-3-mini-4k-instruct") agree.
    "microsoft/Phi-3-mini-4k-instruct": {
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # configs/gpt2-lora.yaml. transformers' GPT2Config defaults (models/gpt2/configuration_gpt2.py,
    # checkpoint="openai-community/gpt2"), the same as https://huggingface.co/Enderchef/JarvisAI/blob/main/config.json
    # (dropouts 0.1 included); the hub config.json has no dtype, so it loads in float32.
    "openai-community/gpt2": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "vocab_size": 50257,
        "activation_function": "gelu_new",
        "attn_pdrop": 0.1,
        "resid_pdrop": 0.1,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
}

# Old names the hub still redirects.
HUB_ARCHITECTURES["gpt2"] = HUB_ARCHITECTURES["openai-community/gpt2"]


def architecture_config(base_model: str, local_folder: Path | None = None, vocab_size: int | None = None) -> dict | None:
    """config.json of a model: from local_folder or a local base_model folder, the built-in shapes, the
    shipped table of hub models, or the local Hugging Face cache (no network). None when unknown.
    vocab_size: a built-in base's vocabulary when its tokenizer is known (it is trained on the data)."""
    for folder in (local_folder, Path(base_model)):
        if folder is not None and (Path(folder) / "config.json").is_file():
            return json.loads((Path(folder) / "config.json").read_text())
    if base_model.startswith("builtin:"):
        from lora_pipeline.ml.base.tiny import builtin_shape, shape_config

        # What build_tiny_llama builds; its vocabulary, trained on the data, is at most the shape's.
        shape = builtin_shape(base_model)
        return {"model_type": "llama", **shape_config(shape, vocab_size or shape.vocab_size), "torch_dtype": "float32"}
    if base_model in HUB_ARCHITECTURES:
        return dict(HUB_ARCHITECTURES[base_model])
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json")
    except Exception:  # not a repo id: nothing cached to read
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


@dataclass(frozen=True)
class Architecture:
    """The shape fields of a config.json, under one naming (GPT-2's n_embd/n_layer/n_head included)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    positions: int  # learned position embeddings (GPT-2); 0 for rotary models
    dtype_bytes: int
    config: dict = field(repr=False, compare=False)

    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        """Read the shape from config.json contents."""
        def get(*names, default=None):
            return next((config[name] for name in names if config.get(name) is not None), default)

        model_type = config.get("model_type", "llama")
        hidden, heads = get("hidden_size", "n_embd"), get("num_attention_heads", "n_head")
        kv_heads = get("num_key_value_heads", "num_kv_heads", default=heads)
        if model_type == "falcon" and not config.get("new_decoder_architecture") and config.get("multi_query", True):
            kv_heads = 1
        dtype = get("torch_dtype", "dtype", default="float32")
        return cls(model_type, hidden, get("num_hidden_layers", "n_layer"), heads, kv_heads,
                   get("head_dim", default=hidden // heads),
                   get("intermediate_size", "n_inner", "ffn_hidden_size", default=4 * hidden), config["vocab_size"],
                   get("tie_word_embeddings", default=model_type in TIED_BY_DEFAULT),
                   get("n_positions", default=0) if model_type == "gpt2" else 0, DTYPE_BYTES.get(dtype, 4), config)

    def block_linears(self) -> list[tuple[str, int, int, bool, str]]:
        """Each decoder block's linear layers: (name, in, out, bias, what feeds it)."""
        h, i, c = self.hidden, self.intermediate, self.config
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.model_type == "gpt2":
            return [("c_attn", h, 3 * h, True, "attn_in"), ("c_proj", h, h, True, "attn_out"),
                    ("c_fc", h, i, True, "mlp_in"), ("c_proj", i, h, True, "mlp_mid")]
        if self.model_type == "falcon":
            bias = bool(c.get("bias", False))
            return [("query_key_value", h, q + 2 * kv, bias, "attn_in"), ("dense", q, h, bias, "attn_out"),
                    ("dense_h_to_4h", h, i, bias, "mlp_in"), ("dense_4h_to_h", i, h, bias, "mlp_mid")]
        if self.model_type == "phi3":
            return [("qkv_proj", h, q + 2 * kv, False, "attn_in"), ("o_proj", q, h, False, "attn_out"),
                    ("gate_up_proj", h, 2 * i, False, "mlp_in"), ("down_proj", i, h, False, "mlp_mid")]
        qkv_bias = self.model_type == "qwen2" or bool(c.get("attention_bias", False))
        o_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
        return [("q_proj", h, q, qkv_bias, "attn_in"), ("k_proj", h, kv, qkv_bias, "attn_in"),
                ("v_proj", h, kv, qkv_bias, "attn_in"), ("o_proj", q, h, o_bias, "attn_out"),
                ("gate_proj", h, i, mlp_bias, "mlp_in"), ("up_proj", h, i, mlp_bias, "mlp_in"),
                ("down_proj", i, h, mlp_bias, "mlp_mid")]

    def other_parameters(self) -> int:
        """Parameters outside the block linears: embeddings, norms, the untied LM head."""
        h = self.hidden
        norm = 2 * h if self.model_type in ("gpt2", "falcon") else h  # LayerNorm has a bias, RMSNorm does not
        per_block = {"gemma2": 4, "gemma3_text": 4}.get(self.model_type, 2)
        if self.model_type == "falcon" and not self.config.get("new_decoder_architecture"):
            per_block = 1  # parallel attention and MLP share one input LayerNorm
        qk_norms = 2 * self.head_dim if self.model_type in ("qwen3", "gemma3_text") else 0
        head = 0 if self.tied else self.vocab * h
        return (self.vocab + self.positions) * h + self.layers * (per_block * norm + qk_norms) + norm + head

    def parameter_count(self) -> int:
        """All parameters of the model, as transformers builds it."""
        linears = sum(n_in * n_out + (n_out if bias else 0) for _, n_in, n_out, bias, _ in self.block_linears())
        return self.layers * linears + self.other_parameters()
