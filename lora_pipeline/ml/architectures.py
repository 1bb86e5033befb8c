"""The shape fields of the hub models the shipped configs name, so memory can be planned offline.

Each entry holds the config.json fields the memory planner reads (nothing else), copied from the
model's config.json as published on the Hugging Face hub; the comment above each says where the
values were read. Dagster-free, no imports: a plain table.
"""

from __future__ import annotations

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
    # checkpoint="openai-community/gpt2"), the same as https://huggingface.co/Enderchef/JarvisAI/blob/main/config.json;
    # the hub config.json has no dtype, so it loads in float32.
    "openai-community/gpt2": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "vocab_size": 50257,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
}

# Old names the hub still redirects.
HUB_ARCHITECTURES["gpt2"] = HUB_ARCHITECTURES["openai-community/gpt2"]
