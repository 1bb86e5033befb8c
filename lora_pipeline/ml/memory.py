"""Peak training memory planned from config.json alone, before any weight is loaded. Dagster-free, no torch.

The plan adds one physical term per effect, each following what this stack (transformers 5, PEFT,
TRL 1.x, bitsandbytes) really allocates: the base weights in their quantization, the adapter, its
gradients and optimizer states, the activations autograd saves, TRL's loss head working set, the
framework's own footprint and an allocator margin. bench/memory_plan.py checks it against measured
CPU peaks; the Llama-3.1-8B QLoRA figure is checked against published ones in tests/test_memory.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from lora_pipeline.ml.architectures import HUB_ARCHITECTURES
from lora_pipeline.ml.modules import resolve_target_modules
from lora_pipeline.ml.precision import DeviceInfo, compute_dtype_name, gradient_checkpointing_enabled, mixed_precision

if TYPE_CHECKING:
    from lora_pipeline.config.schema import LoraSettings, QuantizationSettings, TrainingSettings

GIB, MIB = 1024**3, 1024**2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# CUDA context, cuBLAS workspace and kernels: outside torch's allocator, never in max_memory_allocated.
CUDA_CONTEXT_BYTES = 512 * MIB
# Resident set of a process that imported torch, transformers, peft, trl, bitsandbytes, datasets and pandas,
# loaded a model and ran a training step: measured here (bench/memory_plan.py --baseline, micro model,
# 1 x 16 tokens, whose own terms are under 2 MiB) at 586 MiB; the Dagster run process adds about 35 MiB.
CPU_PROCESS_BASELINE_BYTES = 586 * MIB
# Freed activation blocks the allocator keeps: PyTorch's caching allocator on GPUs, glibc's heap on CPU.
ALLOCATOR_MARGIN = {"cuda": 0.10, "cpu": 0.15}
# bitsandbytes 4-bit: one absmax per 64 weights, fp32, or with double quantization one byte plus an fp32
# absmax per 256 blocks.
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
# TRL's fused LM head (trl/kernels/chunked_logprob.py) never builds the whole [tokens, vocab] logits: it
# projects tiles of 4096 tokens x 32768 vocabulary entries. With Triton (CUDA) a tile is folded in place;
# the torch fallback's backward holds nine fp32 tiles at once (tile, y, z, log_p, p, grad, the target
# one-hot, the difference, the product).
HEAD_TILE = (4096, 32768)
HEAD_TILES = {"triton": 1, "torch": 9}
NORM_FED = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj", "c_attn", "c_fc",
            "query_key_value", "dense_h_to_4h"}
TIED_BY_DEFAULT = {"gpt2", "falcon", "gemma", "gemma2", "gemma3_text"}


def architecture_config(base_model: str, local_folder: Path | None = None) -> dict | None:
    """config.json of a model: from local_folder or a local base_model folder, the built-in shapes, the
    shipped table of hub models, or the local Hugging Face cache (no network). None when unknown."""
    for folder in (local_folder, Path(base_model)):
        if folder is not None and (Path(folder) / "config.json").is_file():
            return json.loads((Path(folder) / "config.json").read_text())
    if base_model.startswith("builtin:"):
        from lora_pipeline.ml.tiny import builtin_shape

        shape = builtin_shape(base_model)
        heads = max(1, shape.hidden_size // 64)  # what build_tiny_llama builds; the vocabulary is an upper bound
        return {"model_type": "llama", "hidden_size": shape.hidden_size, "num_hidden_layers": shape.layers,
                "intermediate_size": -(-shape.hidden_size * 5 // 2 // 64) * 64, "num_attention_heads": heads,
                "num_key_value_heads": heads, "vocab_size": shape.vocab_size, "tie_word_embeddings": False,
                "max_position_embeddings": shape.max_positions, "torch_dtype": "float32"}
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
        h, i, q, kv, c = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.config
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


@dataclass(frozen=True)
class PlanInputs:
    """What a plan was computed from, so knobs can re-plan with one setting changed."""

    architecture: dict
    lora: "LoraSettings"
    quantization: "QuantizationSettings"
    training: "TrainingSettings"
    device: DeviceInfo


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak memory of a training run on its device, term by term, in bytes."""

    base_weights: int
    adapter: int
    gradients: int
    optimizer_states: int
    activations: int
    loss_head: int
    framework: int
    allocator_margin: int
    device: str
    parameters: int
    trainable_parameters: int
    gradient_checkpointing: bool
    inputs: PlanInputs = field(repr=False, compare=False)

    TERMS = ("base_weights", "adapter", "gradients", "optimizer_states", "activations", "loss_head", "framework",
             "allocator_margin")

    @property
    def total(self) -> int:
        """The planned peak: every term added."""
        return sum(getattr(self, name) for name in self.TERMS)

    @property
    def allocated(self) -> int:
        """The part torch allocates itself: what torch.cuda.max_memory_allocated reports on a GPU."""
        return self.total - self.framework - self.allocator_margin

    def render(self) -> str:
        """The breakdown as a small text table."""
        t = self.inputs.training
        lines = [f"memory plan on {self.device}: {self.parameters / 1e9:.2f}B parameters, "
                 f"{self.trainable_parameters / 1e6:.1f}M trainable, batch {t.batch_size} x {t.max_length} tokens, "
                 f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"]
        lines += [f"  {name.replace('_', ' '):<18}{getattr(self, name) / GIB:>8.2f} GiB" for name in self.TERMS]
        return "\n".join(lines + [f"  {'total':<18}{self.total / GIB:>8.2f} GiB"])


def plan_memory(architecture: dict, lora: "LoraSettings", quantization: "QuantizationSettings",
                training: "TrainingSettings", device: DeviceInfo) -> MemoryPlan:
    """Plan the peak memory of training with these config sections on this device, from config.json contents."""
    arch = Architecture.from_config(architecture)
    quantized, gpu = quantization.mode != "none", device.device == "cuda"
    mixed = mixed_precision(training.precision, device) in ("bf16", "fp16")
    checkpointing = gradient_checkpointing_enabled(training.gradient_checkpointing, device)
    compute = DTYPE_BYTES[compute_dtype_name(quantization.compute_dtype, device)] if quantized else arch.dtype_bytes
    act = 2 if mixed else compute
    # prepare_model_for_kbit_training casts every non-quantized parameter (embeddings, norms, head, biases) to fp32,
    # so a quantized model's residual stream is fp32 too.
    resid = 4 if quantized else arch.dtype_bytes
    adapter_bytes = 2 if quantized else 4  # TRL casts QLoRA adapters to bf16; PEFT keeps others in fp32
    lora_bytes = 2 if mixed else adapter_bytes  # the dtype the adapter matmuls run in, and save their inputs in

    linears = arch.block_linears()
    targets = resolve_target_modules(list(lora.target_modules), arch.model_type)
    adapted = [lin for lin in linears if targets == "all-linear" or lin[0] in targets]
    linear_weights = arch.layers * sum(n_in * n_out for _, n_in, n_out, _, _ in linears)
    linear_biases = arch.layers * sum(n_out for _, _, n_out, bias, _ in linears if bias)
    if quantization.mode in ("nf4", "fp4"):
        weights = linear_weights * NF4_BYTES[quantization.double_quant] + 4 * (linear_biases + arch.other_parameters())
    elif quantization.mode == "int8":  # int8 weights plus one fp32 scale per output row
        rows = arch.layers * sum(n_out for _, _, n_out, _, _ in linears)
        weights = linear_weights + 4 * (rows + linear_biases + arch.other_parameters())
    else:
        weights = arch.parameter_count() * arch.dtype_bytes

    lora_tensors = [n for _, n_in, n_out, _, _ in adapted for n in (lora.r * n_in, lora.r * n_out)] * arch.layers
    saved_modules = [name for name in lora.modules_to_save if name in ("lm_head", "embed_tokens", "wte")]
    full_bytes = 2 if quantized else arch.dtype_bytes
    full_tensors = [arch.vocab * arch.hidden] * len(saved_modules)
    trainable = sum(lora_tensors) + sum(full_tensors)
    adapter = sum(lora_tensors) * adapter_bytes + sum(full_tensors) * full_bytes
    optimizer = sum(_optimizer_bytes(training.optimizer, n, adapter_bytes) for n in lora_tensors) + sum(
        _optimizer_bytes(training.optimizer, n, full_bytes) for n in full_tensors)

    activations, loss_head = _activation_bytes(arch, adapted, lora, training, checkpointing, act, resid, adapter_bytes,
                                               lora_bytes, mixed, "triton" if gpu else "torch")
    if "lm_head" in saved_modules:
        loss_head += 4 * arch.vocab * arch.hidden  # the head's weight gradient accumulates in fp32
    framework = CUDA_CONTEXT_BYTES if gpu else CPU_PROCESS_BASELINE_BYTES
    margin = ALLOCATOR_MARGIN["cuda" if gpu else "cpu"] * (activations + loss_head)
    return MemoryPlan(int(weights), int(adapter), int(adapter), int(optimizer), int(activations), int(loss_head),
                      int(framework), int(margin), device.device, arch.parameter_count(), int(trainable), checkpointing,
                      PlanInputs(architecture, lora, quantization, training, device))


def _optimizer_bytes(optimizer: str, numel: int, param_bytes: int) -> float:
    """Optimizer state bytes for one trainable tensor."""
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # bitsandbytes keeps tensors under 4096 elements in 32-bit; others in 8-bit with an fp32 absmax per 2048.
        return 8 * numel if numel < 4096 else 2 * numel + 2 * 4 * numel / 2048
    if optimizer == "paged_adamw_32bit":
        return 8 * numel  # two fp32 moments whatever the parameter dtype
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return 2 * param_bytes * numel  # two moments in the parameter's dtype
    if optimizer == "adafactor":
        return 4 * numel ** 0.5 * 2  # factored second moment: about a row and a column
    return 0  # sgd without momentum


def _activation_bytes(arch: Architecture, adapted, lora, training, checkpointing: bool, act: int, resid: int,
                      adapter_bytes: int, lora_bytes: int, mixed: bool, head_kernel: str) -> tuple[float, float]:
    """Saved activations (with attention masks) and the loss head's working set, for the worst-case batch."""
    h, q, kv, i = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    tokens = training.batch_size * training.max_length
    # Attention saves q, k and v (k, v repeated to every head) and its output; a fused rotary projection keeps its
    # whole output alive behind the v view. The MLP saves gate, up and the activation (the plain MLP only its input).
    fused_rotary = arch.model_type in ("phi3", "falcon")
    attention = (3 * q + (q + 2 * kv) if fused_rotary else 4 * q) * act
    mlp = (3 * i if arch.model_type not in ("gpt2", "falcon") else i) * act
    # Every adapter saves its input for its weight gradient. Without dropout and casts, adapters share one input
    # tensor (q, k and v read the same normed input); otherwise each makes its own copy (plus a dropout mask).
    input_bytes = {"attn_in": resid, "mlp_in": resid, "attn_out": act, "mlp_mid": act}
    shared = lora.dropout == 0 and not mixed and resid == act == adapter_bytes
    if shared:
        feeds = {(feed, n_in) for _, n_in, _, _, feed in adapted if feed != "attn_out"}
        adapter_inputs = sum(n_in * input_bytes[feed] for feed, n_in in feeds)
    else:
        adapter_inputs = sum(n_in * (lora_bytes + (lora.dropout > 0)) for _, n_in, _, _, _ in adapted)
    per_layer = 2 * h * resid + attention + mlp + adapter_inputs + len(adapted) * lora.r * lora_bytes
    # Padded batches carry a [batch, 1, seq, seq] mask, packed (padding-free) ones a [1, 1, tokens, tokens] one;
    # SDPA converts the boolean mask to the activation dtype and saves that copy in every layer.
    mask = tokens**2 if training.packing else (training.batch_size * training.max_length**2 if training.batch_size > 1 else 0)
    # With checkpointing each layer keeps only its input and one layer at a time is recomputed for its backward.
    alive = 1 if checkpointing else arch.layers
    checkpoints = arch.layers * h * resid if checkpointing else 0
    saved = tokens * (checkpoints + alive * per_layer + 2 * h * resid) + mask * (1 + act * alive)  # + final norm, head input
    tile = min(tokens, HEAD_TILE[0]) * min(arch.vocab, HEAD_TILE[1])
    head = tile * HEAD_TILES[head_kernel] * (act if head_kernel == "triton" else 4) + tokens * h * 4  # + fp32 input grad
    if resid != act:  # the fp32 head weight is cast to the compute dtype one vocabulary tile at a time
        head += min(arch.vocab, HEAD_TILE[1]) * h * act
    # Backward holds, besides the saved activations, the head's tiles or one layer's gradients, whichever is larger.
    return saved + max(0, tokens * per_layer - head), head


def fits(plan: MemoryPlan, device_memory_bytes: int) -> bool:
    """Whether the planned peak fits in this much device memory."""
    return plan.total <= device_memory_bytes


def device_memory_bytes(device: DeviceInfo) -> int:
    """Memory the training can use: the GPU's, or the CPU machine's available RAM."""
    if device.device == "cuda":
        return device.gpu_memory_bytes
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Knob:
    """One config change and what it does to the plan."""

    key: str
    old: object
    new: object
    saved_bytes: int
    total_after: int
    fits: bool

    def __str__(self) -> str:
        verdict = "fits" if self.fits else "still too big"
        return (f"{self.key} {self.old} -> {self.new} saves {self.saved_bytes / GIB:.1f} GiB "
                f"({self.total_after / GIB:.1f} GiB, {verdict})")


def _replan(plan: MemoryPlan, changes: dict[str, dict]) -> MemoryPlan:
    sections = {"lora": plan.inputs.lora, "quantization": plan.inputs.quantization, "training": plan.inputs.training}
    for section, update in changes.items():
        sections[section] = sections[section].model_copy(update=update)
    return plan_memory(plan.inputs.architecture, sections["lora"], sections["quantization"], sections["training"],
                       plan.inputs.device)


def _candidates(plan: MemoryPlan) -> dict[str, tuple[object, list[tuple[object, dict]]]]:
    """Per setting: its value and the changes to try, mildest first."""
    t, q, lora = plan.inputs.training, plan.inputs.quantization, plan.inputs.lora
    # A smaller batch keeps the sequences per optimizer step through gradient accumulation.
    batches = [(f"{b} (grad_accumulation {-(-t.batch_size * t.grad_accumulation // b)})",
                {"training": {"batch_size": b, "grad_accumulation": -(-t.batch_size * t.grad_accumulation // b)}})
               for b in range(t.batch_size - 1, 0, -1)]
    lengths = [(t.max_length >> k, {"training": {"max_length": t.max_length >> k}})
               for k in range(1, 8) if t.max_length >> k >= 64]
    found = {"training.batch_size": (t.batch_size, batches), "training.max_length": (t.max_length, lengths)}
    if not plan.gradient_checkpointing:
        found["training.gradient_checkpointing"] = (t.gradient_checkpointing, [("on", {"training": {"gradient_checkpointing": "on"}})])
    if t.packing and t.batch_size > 1:  # a packed batch is one long row whose attention mask grows as tokens squared
        found["training.packing"] = (True, [(False, {"training": {"packing": False}})])
    modes = {"none": ["int8", "nf4"], "int8": ["nf4"]}.get(q.mode, [])
    found["quantization.mode"] = (q.mode, [(mode, {"quantization": {"mode": mode}}) for mode in modes])
    if q.mode in ("nf4", "fp4") and not q.double_quant:
        found["quantization.double_quant"] = (False, [(True, {"quantization": {"double_quant": True}})])
    if t.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        found["training.optimizer"] = (t.optimizer, [("paged_adamw_8bit", {"training": {"optimizer": "paged_adamw_8bit"}})])
    if lora.modules_to_save:
        found["lora.modules_to_save"] = (list(lora.modules_to_save), [([], {"lora": {"modules_to_save": []}})])
    return found


def knobs(plan: MemoryPlan, device_memory_bytes: int) -> list[Knob]:
    """Config changes that lower the peak, each re-planned: single changes (for batch size and max length the
    mildest that fits, else the strongest), those that fit first. When none fits alone, a last entry combines
    the biggest savers until the plan fits."""
    results, changes_of = [], {}
    for key, (old, options) in _candidates(plan).items():
        for new, changes in options:
            after = _replan(plan, changes)
            if fits(after, device_memory_bytes):
                break
        if options and after.total < plan.total:
            results.append(Knob(key, old, new, plan.total - after.total, after.total, fits(after, device_memory_bytes)))
            changes_of[key] = changes
    results.sort(key=lambda knob: (not knob.fits, -knob.saved_bytes))
    if results and not any(knob.fits for knob in results):
        combined: dict[str, dict] = {}
        for knob in results:
            for section, update in changes_of[knob.key].items():
                combined.setdefault(section, {}).update(update)
            after = _replan(plan, combined)
            if fits(after, device_memory_bytes):
                break
        keys = [f"{section}.{name}" for section, update in combined.items() for name in update]
        values = [update[name] for update in combined.values() for name in update]
        results.append(Knob(" + ".join(keys), "current", " + ".join(map(str, values)), plan.total - after.total,
                            after.total, fits(after, device_memory_bytes)))
    return results
