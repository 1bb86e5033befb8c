"""FLOPs per trained token of a LoRA / QLoRA step on a Llama-shaped model, and the MFU they give.

Counted honestly for LoRA (the frozen base gets no weight gradient), per token:
  frozen matmuls   4N       forward 2N + gradient of their inputs 2N; N = every matmul weight of the layers run
                            (q, k, v, o, gate, up, down per layer, and the LM head; embedding lookups excluded)
  adapters         6 r (in + out) per adapted projection per layer: forward, input gradient and weight gradient
  attention        6 L q_dim S_eff: scores and values forward (4 q_dim S) and backward (8 q_dim S), halved for
                   causal masking; S_eff = sum(n^2) / sum(n) over the documents' lengths n (S for one length)
TRL and most papers quote 6N (full fine-tuning's count, no attention): for LoRA that counts a weight gradient the
frozen base never gets, so its matmul term overstates the work by 6N / 4N = 1.5x.

Pure Python, no torch: the CPU test checks these numbers by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
H200_DENSE_BF16_TFLOPS = 989.0  # the datasheet's dense bf16 tensor-core peak of the H100/H200 SXM


@dataclass(frozen=True)
class LlamaShape:
    """The fields of a Llama config.json that the FLOP count reads."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def projections(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear projections: name -> (in_features, out_features)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @classmethod
    def from_config(cls, config: dict) -> "LlamaShape":
        return cls(hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                   layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                   kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                   vocab=config["vocab_size"], head_dim=config.get("head_dim") or 0)


def matmul_parameters(shape: LlamaShape) -> int:
    """N: the weights every token is multiplied with (all layers' projections and the LM head)."""
    per_layer = sum(n_in * n_out for n_in, n_out in shape.projections().values())
    return shape.layers * per_layer + shape.vocab * shape.hidden


def adapter_flops(shape: LlamaShape, rank: int, targets=LLAMA_PROJECTIONS) -> int:
    """Per token: each adapter's A (r x in) and B (out x r) forward, input gradient and weight gradient."""
    per_layer = sum(n_in + n_out for name, (n_in, n_out) in shape.projections().items() if name in targets)
    return 6 * rank * per_layer * shape.layers


def effective_context(document_lengths: list[int]) -> float:
    """The context length a token attends over on average, before causal halving: sum(n^2) / sum(n)."""
    total = sum(document_lengths)
    return sum(n * n for n in document_lengths) / total if total else 0.0


def attention_flops(shape: LlamaShape, document_lengths: list[int]) -> float:
    """Per token: QK^T and PV forward (2 matmuls) and backward (4), causal (half the score matrix)."""
    return 6 * shape.layers * shape.q_dim * effective_context(document_lengths)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per trained token, term by term."""

    matmul_parameters: int
    frozen: int
    adapters: int
    attention: float

    @property
    def per_token(self) -> float:
        """The honest LoRA count: 4N + adapters + attention."""
        return self.frozen + self.adapters + self.attention

    @property
    def six_n(self) -> int:
        """TRL's convention: 6N per token."""
        return 6 * self.matmul_parameters

    @property
    def six_n_over_honest(self) -> float:
        """How much the 6N figure overstates this count (1.5 on the matmul term alone)."""
        return self.six_n / self.per_token

    def as_dict(self) -> dict:
        return {"matmul_parameters": self.matmul_parameters, "frozen_4n": self.frozen, "adapters": self.adapters,
                "attention": self.attention, "per_token": self.per_token, "six_n": self.six_n,
                "six_n_over_honest": self.six_n_over_honest}


def lora_flops(shape: LlamaShape, rank: int, document_lengths: list[int], targets=LLAMA_PROJECTIONS) -> FlopCount:
    """The FLOPs per token of one LoRA training step on documents of these lengths."""
    n = matmul_parameters(shape)
    return FlopCount(n, 4 * n, adapter_flops(shape, rank, targets), attention_flops(shape, document_lengths))


def mfu(flops_per_token: float, tokens_per_second: float, peak_tflops: float = H200_DENSE_BF16_TFLOPS) -> float:
    """Model FLOPs utilisation: the FLOP/s the counted work implies over the peak."""
    return flops_per_token * tokens_per_second / (peak_tflops * 1e12)


def steady_tokens_per_second(step_times: list[tuple[int, float]], tokens_per_step: float, warmup_steps: int) -> float:
    """Tokens/s between the end of step warmup_steps and the last step (compilation and first-step costs left out).

    step_times: (optimizer step, wall-clock seconds) when each logged step ended. With too few steps for a
    warm-up, the whole span after the first logged step.
    """
    if len(step_times) < 2:
        return 0.0
    ordered = sorted(step_times)
    later = [entry for entry in ordered if entry[0] >= warmup_steps]
    start = later[0] if len(later) >= 2 else ordered[0]
    end = ordered[-1]
    seconds = end[1] - start[1]
    return tokens_per_step * (end[0] - start[0]) / seconds if seconds > 0 else 0.0
