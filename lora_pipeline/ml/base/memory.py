"""Peak training memory planned from config.json alone, before any weight is loaded. Dagster-free, no torch.

The plan adds one physical term per effect, each following what this stack (transformers 5, PEFT 0.21,
TRL 1.16, bitsandbytes 0.50) really allocates: the base weights in their quantization, the adapter, its
gradients and optimizer states, the activations autograd saves, TRL's loss head, the framework's own
footprint and an allocator margin. bench/memory_plan.py compares it with measured CPU peaks.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_pipeline.ml.base.architectures import DTYPE_BYTES, Architecture, architecture_config
from lora_pipeline.ml.base.modules import resolve_target_modules
from lora_pipeline.ml.base.precision import DeviceInfo, compute_dtype_name, gradient_checkpointing_enabled, mixed_precision
from lora_pipeline.ml.training.distributed import plan_launch

if TYPE_CHECKING:
    from lora_pipeline.config.schema import LoraSettings, ModelConfig, QuantizationSettings, TrainingSettings

GIB, MIB = 1024**3, 1024**2
# CUDA context, cuBLAS workspace and kernels: outside torch's allocator, never in max_memory_allocated.
CUDA_CONTEXT_BYTES = 512 * MIB
# Resident set of a process that imported torch, transformers, peft, trl, bitsandbytes, datasets, pandas and
# dagster, loaded a model and ran a training step, measured on this project's 2-core machine with
# `python bench/memory_plan.py --baseline` (micro model, 1 x 32 tokens, its own terms under 2 MiB): 587 MiB.
CPU_PROCESS_BASELINE_BYTES = 587 * MIB
# Freed activation memory the allocator keeps, as a share of activations and loss head. GPU: PyTorch's caching
# allocator. CPU: glibc keeps freed blocks under its mmap threshold (up to 32 MiB) in the heap. With
# MALLOC_MMAP_THRESHOLD_=65536 (nothing kept) the bench's peaks sit within 7% (mean 2%) of the plan without this
# margin; with the default allocator its cases hold 1.3 to 2.1 times their live dynamic memory (median 1.5).
ALLOCATOR_MARGIN = {"cuda": 0.10, "cpu": 0.50}
# bitsandbytes 4-bit: per 64 weights one fp32 absmax, or with double quantization one byte and an fp32 absmax per 256.
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
# On CUDA, TRL's fused LM head (trl/kernels/chunked_logprob.py) never builds the whole [tokens, vocab] logits: it
# projects tiles of 4096 tokens x 32768 vocabulary entries, and Triton folds a tile in place.
HEAD_TILE = (4096, 32768)
# The dequantization cache's 'auto' turns it on only when the whole plan with it stays within this share of memory.
CACHE_SHARE = 0.5
# Elsewhere the lean loss (ml/training/step.py) projects the labelled positions at once: in backward the fp32
# log-probabilities it saved, their gradient and the logits' gradient, each [tokens, vocabulary].
LEAN_HEAD_COPIES = 3


@dataclass(frozen=True)
class PlanInputs:
    """What a plan was computed from, so knobs can re-plan with settings changed."""

    architecture: dict
    lora: "LoraSettings"
    quantization: "QuantizationSettings"
    training: "TrainingSettings"
    device: DeviceInfo
    eval_batch_size: int = 8


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak memory of a training run on its device, term by term, in bytes; notes say what each holds."""

    base_weights: int
    adapter: int
    gradients: int
    optimizer_states: int
    activations: int
    loss_head: int
    dequant_cache: int
    framework: int
    allocator_margin: int
    device: str
    parameters: int
    trainable_parameters: int
    gradient_checkpointing: bool
    notes: dict[str, str] = field(repr=False, compare=False)
    inputs: PlanInputs = field(repr=False, compare=False)
    evaluation: int = 0

    TERMS = ("base_weights", "adapter", "gradients", "optimizer_states", "activations", "loss_head", "dequant_cache",
             "evaluation", "framework", "allocator_margin")

    @property
    def total(self) -> int:
        """The planned peak: every term added."""
        return sum(getattr(self, name) for name in self.TERMS)

    @property
    def allocated(self) -> int:
        """What torch itself allocates, comparable with torch.cuda.max_memory_allocated on a GPU."""
        return self.total - self.framework - self.allocator_margin

    def terms(self) -> dict[str, int]:
        """The terms by name, for metadata."""
        return {name: getattr(self, name) for name in self.TERMS}

    def render(self) -> str:
        """The breakdown as a text table (GiB, or MiB for plans under 4 GiB)."""
        unit, unit_name = (GIB, "GiB") if self.total >= 4 * GIB else (MIB, "MiB")
        t = self.inputs.training
        size = f"{self.parameters / 1e9:.2f}B" if self.parameters >= 1e8 else f"{self.parameters / 1e6:.1f}M"
        lines = [f"memory plan on {self.device}: {size} parameters, "
                 f"{self.trainable_parameters:,} trainable, batch {t.batch_size} x {t.max_length} tokens"]
        lines += [f"  {name.replace('_', ' '):<17}{getattr(self, name) / unit:>9.2f} {unit_name}  {self.notes[name]}"
                  for name in self.TERMS]
        return "\n".join(lines + [f"  {'total':<17}{self.total / unit:>9.2f} {unit_name}"])


def plan_memory(architecture: dict, lora: "LoraSettings", quantization: "QuantizationSettings",
                training: "TrainingSettings", device: DeviceInfo, eval_batch_size: int = 8) -> MemoryPlan:
    """Plan the peak memory of training with these config sections on this device, from config.json contents.
    eval_batch_size: the batches of the evaluations while training (training.eval_steps), eval.batch_size."""
    arch = Architecture.from_config(architecture)
    quantized, gpu = quantization.mode != "none", device.device == "cuda"
    mixed = mixed_precision(training.precision, device) in ("bf16", "fp16")
    checkpointing = gradient_checkpointing_enabled(training.gradient_checkpointing, device)
    compute = DTYPE_BYTES[compute_dtype_name(quantization.compute_dtype, device)] if quantized else arch.dtype_bytes
    act = 2 if mixed else compute
    # prepare_model_for_kbit_training casts every non-quantized parameter (embeddings, norms, head, biases) to
    # fp32, so a quantized model's residual stream is fp32 too. QLoRA adapters (and other trainable modules) train
    # in bf16 when the run is bf16, else fp32 (the trainer undoes TRL's bf16 cast); PEFT keeps other adapters in
    # fp32. Adapter matmuls run, and save inputs, in lora_bytes.
    trainable_bytes = 2 if mixed_precision(training.precision, device) == "bf16" else 4
    resid, adapter_bytes, full_bytes = (4, trainable_bytes, trainable_bytes) if quantized else \
        (arch.dtype_bytes, 4, arch.dtype_bytes)
    lora_bytes = 2 if mixed else adapter_bytes

    linears = arch.block_linears()
    targets = resolve_target_modules(list(lora.target_modules), arch.model_type)
    adapted = [lin for lin in linears if targets == "all-linear" or lin[0] in targets]
    linear_weights = arch.layers * sum(n_in * n_out for _, n_in, n_out, _, _ in linears)
    unquantized = arch.parameter_count() - linear_weights  # embeddings, norms, head, biases
    if quantization.mode in ("nf4", "fp4"):
        weights = linear_weights * NF4_BYTES[quantization.double_quant] + 4 * unquantized
    elif quantization.mode == "int8":  # int8 weights and one fp32 scale per output row
        weights = linear_weights + 4 * (unquantized + arch.layers * sum(lin[2] for lin in linears))
    else:
        weights = arch.parameter_count() * arch.dtype_bytes

    shapes = [shape for _, n_in, n_out, _, _ in adapted for shape in ((lora.r, n_in), (n_out, lora.r))] * arch.layers
    full = [(arch.vocab, arch.hidden) for name in lora.modules_to_save if name in ("lm_head", "embed_tokens", "wte")]
    trainable = sum(rows * cols for rows, cols in shapes + full)
    adapter = sum(rows * cols for rows, cols in shapes) * adapter_bytes + sum(r * c for r, c in full) * full_bytes
    optimizer = sum(_optimizer_bytes(training.optimizer, shape, adapter_bytes) for shape in shapes) + sum(
        _optimizer_bytes(training.optimizer, shape, full_bytes) for shape in full)
    # A 4-bit layer's backward (bitsandbytes MatMul4Bit) dequantizes its whole weight in the compute dtype, unless
    # the dequantization cache holds every weight dequantized for the whole run.
    four_bit = quantization.mode in ("nf4", "fp4")
    cache = linear_weights * compute if four_bit and training.dequant_cache == "on" else 0
    largest = max(n_in * n_out for _, n_in, n_out, _, _ in linears)
    dequantized = largest * act if four_bit and not cache else 0
    activations, loss_head = _activation_bytes(arch, adapted, lora, training, checkpointing, act, resid, adapter_bytes,
                                               lora_bytes, mixed, "triton" if gpu else "lean", dequantized)
    if "lm_head" in lora.modules_to_save:
        loss_head += 4 * arch.vocab * arch.hidden  # a trained head's weight gradient accumulates in fp32
    framework = CUDA_CONTEXT_BYTES if gpu else CPU_PROCESS_BASELINE_BYTES
    margin = ALLOCATOR_MARGIN["cuda" if gpu else "cpu"] * (activations + loss_head)
    # Per device: FSDP shards weights, adapter, gradients and optimizer states over the ranks and gathers one
    # layer at a time (two with prefetching); DDP keeps everything whole, plus its gradient buckets.
    launch = plan_launch(training.distributed, device)
    gradients = adapter
    if launch.strategy == "fsdp":
        layer = sum(n_in * n_out for _, n_in, n_out, _, _ in linears) * (compute if quantized else arch.dtype_bytes)
        weights, adapter, gradients, optimizer = (term / launch.world_size
                                                  for term in (weights, adapter, gradients, optimizer))
        weights += 2 * layer
    elif launch.strategy == "ddp":
        gradients *= 2
    evaluation, evaluation_note = _evaluation_bytes(arch, training, eval_batch_size, act, gradients + activations
                                                    + loss_head, adapter if not gpu else 0)
    dtype = {4: "fp32", 2: "16-bit"}
    double = " + double quant" if quantization.mode in ("nf4", "fp4") and quantization.double_quant else ""
    notes = {
        "base_weights": f"{quantization.mode}{double} linears, fp32 embeddings, norms and head" if quantized
                        else f"all {dtype[arch.dtype_bytes]}",
        "adapter": f"LoRA r={lora.r} on {', '.join(sorted({lin[0] for lin in adapted}))} in {dtype[adapter_bytes]}"
                   + (f", {'/'.join(lora.modules_to_save)} trained in full" if full else ""),
        "gradients": "one per trainable parameter" + (" and DDP's buckets" if launch.strategy == "ddp" else ""),
        "optimizer_states": training.optimizer,
        "activations": f"{training.batch_size * training.max_length} tokens{' packed' if training.packing else ''},"
                       f" checkpointing {'on' if checkpointing else 'off'}, {dtype[act]}",
        "loss_head": "TRL's chunked log-probabilities, Triton" if gpu else "log-probabilities of the labelled tokens",
        "dequant_cache": "4-bit weights dequantized once, in the compute dtype" if cache else "off",
        "evaluation": evaluation_note,
        "framework": "CUDA context" if gpu else "Python process with the training stack",
        "allocator_margin": f"{ALLOCATOR_MARGIN['cuda' if gpu else 'cpu']:.0%} of activations and loss head"}
    if launch.strategy == "fsdp":
        for name in ("base_weights", "adapter", "gradients", "optimizer_states"):
            notes[name] += f"; sharded over {launch.world_size} ranks (FSDP)"
        notes["base_weights"] += ", two layers gathered whole"
    return MemoryPlan(int(weights), int(adapter), int(gradients), int(optimizer), int(activations), int(loss_head),
                      int(cache), int(framework), int(margin), device.device, arch.parameter_count(), trainable, checkpointing,
                      notes, PlanInputs(architecture, lora, quantization, training, device, eval_batch_size),
                      int(evaluation))


def plan_for_config(config: "ModelConfig", device: DeviceInfo,
                    local_folder: Path | None = None, vocab_size: int | None = None) -> MemoryPlan | None:
    """The plan of a whole model config on a device; None when the base model's config.json is not known here.
    vocab_size: a built-in base's vocabulary, when its tokenizer has been trained (validate)."""
    architecture = architecture_config(config.base_model, local_folder, vocab_size)
    if architecture is None:
        return None
    if config.preference_tuning:
        from lora_pipeline.ml.preference.memory import preference_plan

        return preference_plan(architecture, config, device)
    return plan_memory(architecture, config.lora, config.quantization, config.training, device, config.eval.batch_size)


def _evaluation_bytes(arch: Architecture, training: "TrainingSettings", batch_size: int, act: int,
                      training_transient: float, best_copy: int) -> tuple[float, str]:
    """What evaluating while training adds to the peak, and a note saying what.

    The held-out batches run between steps, after the step's gradients and activations are freed, so only the
    part of their working set above the step's counts: the full fp32 logits, their log-softmax and the scored
    copy, each [eval tokens, vocabulary], and about one layer's activations (no graph is kept). With
    training.keep_best a copy of the trainable weights stays in host memory (device memory on a CPU).
    """
    if not training.eval_steps:
        return 0, "off"
    tokens = batch_size * training.max_length
    working = tokens * (LEAN_HEAD_COPIES * arch.vocab * 4 + (4 * arch.hidden + arch.intermediate) * act)
    above = max(0.0, working - training_transient)
    copy = best_copy if training.keep_best else 0
    note = f"held-out batches of {batch_size} x {training.max_length} tokens every {training.eval_steps} steps"
    return above + copy, note + (", the best adapter's copy" if copy else "")


def _optimizer_bytes(optimizer: str, shape: tuple[int, int], param_bytes: int) -> float:
    """Optimizer state bytes of one trainable matrix."""
    numel = shape[0] * shape[1]
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # bitsandbytes keeps tensors under 4096 elements in 32-bit, others in 8-bit with an fp32 absmax per 2048.
        return 8 * numel if numel < 4096 else 2 * numel + 2 * 4 * numel / 2048
    if optimizer == "paged_adamw_32bit":
        return 8 * numel  # two fp32 moments whatever the parameter dtype
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return 2 * param_bytes * numel  # two moments in the parameter's dtype
    if optimizer == "adafactor":
        return 4 * (shape[0] + shape[1])  # a factored second moment: one row and one column
    return 0  # sgd without momentum


def _activation_bytes(arch: Architecture, adapted, lora, training, checkpointing: bool, act: int, resid: int,
                      adapter_bytes: int, lora_bytes: int, mixed: bool, head_kernel: str,
                      dequantized: int) -> tuple[float, float]:
    """Saved activations (with attention masks) and the loss head's working set, for the worst-case batch."""
    h, i, config = arch.hidden, arch.intermediate, arch.config
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    tokens = training.batch_size * training.max_length
    # Attention saves q, k and v (k, v repeated to every head) and its output; a fused rotary projection keeps its
    # whole output alive behind the v view. A gated MLP saves gate, up and the activation; a plain one its input, and
    # GPT-2's gelu_new, written out in Python, also its tanh, 0.5 x and 1 + tanh.
    attention = (3 * q + (q + 2 * kv) if arch.model_type in ("phi3", "falcon") else 4 * q) * act
    activation = config.get("activation_function", "gelu_new" if arch.model_type == "gpt2" else "gelu")
    mlp = (3 if arch.model_type not in ("gpt2", "falcon") else 4 if activation == "gelu_new" else 1) * i * act
    # Every adapter saves its input for its weight gradient. Without dropout and casts, adapters share one input
    # tensor (q, k and v read the same normed input); otherwise each makes its own copy (plus a dropout mask).
    input_bytes = {"attn_in": resid, "mlp_in": resid, "attn_out": act, "mlp_mid": act}
    shared = lora.dropout == 0 and not mixed and resid == act == adapter_bytes
    if shared:
        feeds = {(feed, n_in) for _, n_in, _, _, feed in adapted if feed != "attn_out"}
        adapter_inputs = sum(n_in * input_bytes[feed] for feed, n_in in feeds)
    else:
        adapter_inputs = sum(n_in * (lora_bytes + (lora.dropout > 0)) for _, n_in, _, _, _ in adapted)
    residual_dropout = 2 * h if (config.get("resid_pdrop") or config.get("hidden_dropout") or 0) > 0 else 0  # masks
    per_token = 2 * h * resid + attention + mlp + adapter_inputs + len(adapted) * lora.r * lora_bytes + residual_dropout
    # Attention scores span [batch, seq, seq] when padded and [tokens, tokens] when packed (padding-free). With the
    # model's own (dense) attention a padded or packed batch carries a boolean mask of that size, which SDPA converts
    # to the activation dtype and saves in every layer; per-document attention builds no mask. With attention dropout
    # (GPT-2's attn_pdrop) SDPA on CPU falls back to its math path and saves the probabilities, the dropout mask and
    # the dropped probabilities for every head.
    scores = tokens**2 if training.packing else training.batch_size * training.max_length**2
    dense = training.attention == "dense"
    mask = scores if dense and (training.packing or training.batch_size > 1) else 0
    dropout = config.get("attn_pdrop", config.get("attention_dropout")) or 0
    probabilities = 3 * arch.heads * scores * act if dropout > 0 and head_kernel != "triton" else 0
    # With checkpointing each layer keeps only its input and one layer at a time is recomputed for its backward.
    alive = 1 if checkpointing else arch.layers
    checkpoints = arch.layers * h * resid if checkpointing else 0
    final = 2 * h * resid  # the final norm's input and the head's input
    saved = tokens * (checkpoints + alive * per_token + final) + mask + alive * (mask * act + probabilities)
    if head_kernel == "lean":
        head = LEAN_HEAD_COPIES * tokens * arch.vocab * 4 + tokens * h * 4
    else:  # one tile, and the fp32 gradient of the head's input
        head = min(tokens, HEAD_TILE[0]) * min(arch.vocab, HEAD_TILE[1]) * act + tokens * h * 4
    if resid != act:  # the fp32 head weight is cast to the compute dtype one vocabulary tile at a time
        head += min(arch.vocab, HEAD_TILE[1]) * h * act
    # Backward holds, besides the saved activations, the head's tiles or one layer's gradients (and its dequantized
    # weight), whichever is larger.
    return saved + max(0, tokens * per_token + probabilities + dequantized - head), head


def fits(plan: MemoryPlan, device_memory_bytes: int) -> bool:
    """Whether the planned peak fits in this much device memory."""
    return plan.total <= device_memory_bytes


def usable_memory_bytes(device: DeviceInfo) -> int:
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
    """Config changes (dotted key, old value, new value) and the plan they give."""

    changes: tuple[tuple[str, object, object], ...]
    saved_bytes: int
    total_after: int
    fits: bool

    @property
    def overrides(self) -> list[str]:
        """The changes as `--set key=value` overrides (values in JSON, which YAML reads back unchanged)."""
        return [f"{key}={json.dumps(new)}" for key, _, new in self.changes]

    def __str__(self) -> str:
        changes = ", ".join(f"{key} {old} -> {new}" for key, old, new in self.changes)
        verdict = "fits" if self.fits else "still too big"
        return f"{changes} saves {self.saved_bytes / GIB:.1f} GiB ({self.total_after / GIB:.1f} GiB, {verdict})"


def _candidates(plan: MemoryPlan, shortest: int = 64) -> dict[str, list[dict[str, object]]]:
    """Per setting, the changes that can lower the peak, mildest first, as {dotted key: new value}. shortest: the
    least max_length to suggest (the data's: what keeps 95% of the examples whole)."""
    t, q, lora = plan.inputs.training, plan.inputs.quantization, plan.inputs.lora
    steps = t.batch_size * t.grad_accumulation  # a smaller batch keeps the sequences per step by accumulating
    found = {"training.batch_size": [{"training.batch_size": b, "training.grad_accumulation": -(-steps // b)}
                                     for b in range(t.batch_size - 1, 0, -1)],
             "training.max_length": [{"training.max_length": t.max_length >> k}
                                     for k in range(1, 8) if t.max_length >> k >= max(64, shortest)],
             "quantization.mode": [{"quantization.mode": mode}
                                   for mode in {"none": ["int8", "nf4"], "int8": ["nf4"]}.get(q.mode, [])]}
    if not plan.gradient_checkpointing:
        found["training.gradient_checkpointing"] = [{"training.gradient_checkpointing": "on"}]
    if t.attention == "dense" and t.packing and t.batch_size > 1:  # one long row: a mask of tokens squared
        found["training.attention"] = [{"training.attention": "auto"}]
    if plan.dequant_cache:
        found["training.dequant_cache"] = [{"training.dequant_cache": "off"}]
    if q.mode in ("nf4", "fp4") and not q.double_quant:
        found["quantization.double_quant"] = [{"quantization.double_quant": True}]
    if t.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        found["training.optimizer"] = [{"training.optimizer": "paged_adamw_8bit"}]
    if lora.modules_to_save:
        found["lora.modules_to_save"] = [{"lora.modules_to_save": []}]
    gpus = plan.inputs.device.gpu_count if plan.device == "cuda" else 0
    if gpus > 1 and t.distributed.strategy != "fsdp":  # shard the model over more of this machine's GPUs
        found["training.distributed.nproc_per_node"] = [
            {"training.distributed.strategy": "fsdp", "training.distributed.nproc_per_node": str(n)}
            for n in (2, 4, 8) if n <= gpus]
    return {key: options for key, options in found.items() if options}


def resolve_dequant_cache(plan: MemoryPlan, device_memory_bytes: int) -> MemoryPlan:
    """The plan with training.dequant_cache 'auto' decided: on off-GPU 4-bit training whose plan with the cache
    uses at most CACHE_SHARE of the memory (it is a speed-up, never worth crowding the machine), off otherwise.
    On GPUs bitsandbytes' dequantization kernels are fast and memory is what QLoRA is for: off."""
    t, q = plan.inputs.training, plan.inputs.quantization
    if t.dequant_cache != "auto":
        return plan
    if plan.device != "cuda" and q.mode in ("nf4", "fp4"):
        cached = _replan(plan, {"training.dequant_cache": "on"})
        if cached.total <= CACHE_SHARE * device_memory_bytes:
            return cached
    return _replan(plan, {"training.dequant_cache": "off"})


def _replan(plan: MemoryPlan, changes: dict[str, object]) -> MemoryPlan:
    sections = {"lora": plan.inputs.lora, "quantization": plan.inputs.quantization, "training": plan.inputs.training}
    for key, value in changes.items():
        section, *path = key.split(".")
        sections[section] = _with_value(sections[section], path, value)
    return plan_memory(plan.inputs.architecture, sections["lora"], sections["quantization"], sections["training"],
                       plan.inputs.device, plan.inputs.eval_batch_size)


def _with_value(section, path: list[str], value):
    """A copy of a config section with the value at path (nested sections, e.g. training.distributed.X, too)."""
    inner = value if len(path) == 1 else _with_value(getattr(section, path[0]), path[1:], value)
    return section.model_copy(update={path[0]: inner})


def _try(plan: MemoryPlan, applied: dict, options: list[dict], memory: int) -> tuple[dict, MemoryPlan]:
    """On top of the applied changes, the mildest option that fits, else the strongest."""
    for option in options:
        tried = option, _replan(plan, {**applied, **option})
        if fits(tried[1], memory):
            break
    return tried


def _knob(plan: MemoryPlan, changes: dict, after: MemoryPlan, memory: int) -> Knob:
    current = {key: functools.reduce(getattr, key.split("."), plan.inputs) for key in changes}
    return Knob(tuple((key, current[key], value) for key, value in changes.items()), plan.total - after.total,
                after.total, fits(after, memory))


def knobs(plan: MemoryPlan, device_memory_bytes: int, shortest: int = 64) -> list[Knob]:
    """For a plan that does not fit: config changes that lower its peak, each re-planned. Single changes (for batch
    size and max length the mildest that fits, else the strongest), those that fit first, then by savings. When
    none fits alone, the first entry combines changes (the biggest saver first until the plan fits, then each backed
    off to its mildest value that still fits). Empty when the plan fits. shortest: the least max_length to
    suggest."""
    if fits(plan, device_memory_bytes):
        return []
    candidates, singles = _candidates(plan, shortest), []
    for options in candidates.values():
        tried = _try(plan, {}, options, device_memory_bytes)
        if plan.total - tried[1].total > plan.total / 100:
            singles.append(_knob(plan, tried[0], tried[1], device_memory_bytes))
    singles.sort(key=lambda knob: (not knob.fits, -knob.saved_bytes))
    if not singles or singles[0].fits:
        return singles
    chosen: dict[str, dict] = {}  # per setting, the option the combination uses

    def combined(leaving_out: str | None = None) -> dict:
        return {k: v for key, option in chosen.items() if key != leaving_out for k, v in option.items()}

    after, remaining = plan, dict(candidates)
    while remaining and not fits(after, device_memory_bytes):
        tries = [(key, _try(plan, combined(), options, device_memory_bytes)) for key, options in remaining.items()]
        key, best = min(tries, key=lambda kv: kv[1][1].total)
        if best[1].total >= after.total:
            break
        chosen[key], after = best
        del remaining[key]
    if fits(after, device_memory_bytes):  # then back each setting off to the mildest value that still fits
        for key in list(chosen):
            chosen[key], after = _try(plan, combined(leaving_out=key), candidates[key], device_memory_bytes)
    return ([_knob(plan, combined(), after, device_memory_bytes)] if len(chosen) > 1 else []) + singles
