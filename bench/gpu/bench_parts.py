"""One part of the GPU bench, run in a process of its own by gpu_bench.py, printing one tagged JSON record.

Each part is a separate process so that a crash, an out-of-memory error or a global patch (Liger's fallback)
in one cannot spoil the next, and so that CUDA's peak-memory counters start clean. Parts:
  environment   versions, device, attention kernels, bf16 matmul rate, how the config schema loaded
  plan          no model: FLOPs per token and the planner's micro-batch for the shape (what --dry-run runs)
  demo          configs/tiny-demo.yaml trained through the project's code (built-in base, NF4, train_adapter)
  build         an 8B-shaped random Llama (local, no download), NF4-quantized with quantize_base; picks the
                micro-batch from the project's memory planner
  qlora         train_adapter on that base with one variant's settings: tokens/s, MFU, peak vs the plan

usage: python bench/gpu/bench_parts.py PART --spec JSON   (gpu_bench.py writes the spec)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import bench_env
from flop_count import LLAMA_PROJECTIONS, LlamaShape, lora_flops, mfu, steady_tokens_per_second
from result_table import GIB, result_line, with_derived

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size")
LLAMA_3_ROPE = {"rope_theta": 500000.0, "rms_norm_eps": 1e-5}
# For checking the code path on a CPU: widths bitsandbytes' CPU 4-bit kernel runs (multiples of 64).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 4096}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0-3; random training tokens are drawn above them

# The variants' settings on top of the baseline; keys the schema lacks are dropped (and the variant skipped if it
# needs them). Quoted values: YAML would read a bare off/on as a boolean.
BASELINE = ['training.attention="dense"', "training.padding_free=false", "training.liger_kernel=false",
            'training.dequant_cache="off"']
VARIANTS = {
    "baseline": {"set": [], "about": "transformers' SDPA over full rows, no Liger, 4-bit dequantized every pass"},
    "liger": {"set": ["training.liger_kernel=true"], "about": "Liger's RMSNorm, RoPE and SwiGLU kernels"},
    "per_document": {"set": ['training.attention="auto"', "training.padding_free=true"],
                     "about": "padding-free rows, per-document (varlen Flash) attention"},
    "dequant_cache": {"set": ['training.dequant_cache="on"'], "about": "4-bit weights dequantized once"},
    "all": {"set": ["training.liger_kernel=true", 'training.attention="auto"', "training.padding_free=true",
                    'training.dequant_cache="on"'], "about": "liger + per_document + dequant_cache"},
    "flash_sdpa": {"set": [], "sdpa": "flash", "about": "baseline with SDPA restricted to the Flash backend"},
}


def model_shape(spec: dict) -> dict:
    """The random base's config.json fields: Llama-3.1-8B's shapes as the planner knows them (or tiny ones), rope
    theta 500000, spec['layers'] layers."""
    from lora_pipeline.ml.base.architectures import HUB_ARCHITECTURES

    llama_8b = HUB_ARCHITECTURES["meta-llama/Llama-3.1-8B"]
    fields = {**(TINY if spec["tiny"] else {name: llama_8b[name] for name in SHAPE_FIELDS}), **LLAMA_3_ROPE}
    fields.update(num_hidden_layers=spec["layers"], max_position_embeddings=max(8192, spec["seq_len"]),
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return fields


def qlora_overrides(spec: dict, micro_batch: int, variant: str) -> list[str]:
    """configs/llama-3.1-8b-qlora.yaml made a throughput run: one epoch of spec['steps'] full-length micro-batches."""
    work = Path(spec["work"])
    checkpointing = "on" if spec.get("gradient_checkpointing") else "off"
    fixed = [f"base_model={work / 'base'}", f"training.max_length={spec['seq_len']}",
             f"training.batch_size={micro_batch}", "training.grad_accumulation=1", "training.epochs=1",
             f"training.max_steps={spec['steps']}", "training.logging_steps=1", "training.checkpoint_every=0",
             # Every row is already seq_len tokens: nothing to pack. Fused AdamW instead of the recipe's paged
             # optimizer, whose managed memory the device notes warn against (the adapter's states are tiny).
             "training.packing=false", 'training.optimizer="adamw_torch_fused"',
             f'training.gradient_checkpointing="{checkpointing}"']
    return fixed + BASELINE + VARIANTS[variant]["set"] + list(spec.get("overrides", []))


def _device():
    from lora_pipeline.ml.base.precision import detect_device

    return detect_device()


def _train_options(training, device) -> dict:
    """train_adapter's options argument where this checkout has one: the dequantization cache as the config says."""
    if "dequant_cache" not in type(training).model_fields:
        return {}
    try:
        from lora_pipeline.ml.training import step_options
    except ImportError:
        return {}
    return {"options": step_options(training, device, dequant_cache=training.dequant_cache == "on")}


def _train_adapter():
    from lora_pipeline.ml.training import train_adapter

    return train_adapter


def _peak_fields(result, plan, device) -> dict:
    """Measured peak beside the plan: torch's allocated peak against plan.allocated on CUDA, RSS against the total."""
    basis = plan.allocated if device.device == "cuda" else plan.total
    fields = {"peak_gib": result.peak_memory_bytes / GIB, "peak_kind": result.peak_memory_kind,
              "plan_allocated_gib": basis / GIB, "plan_total_gib": plan.total / GIB,
              "plan_terms_gib": {name: value / GIB for name, value in plan.terms().items()}}
    if device.device == "cuda":
        import torch

        fields["reserved_peak_gib"] = torch.cuda.max_memory_reserved() / GIB
    return fields


def part_environment(spec: dict) -> dict:
    return bench_env.environment_record()


def part_demo(spec: dict) -> dict:
    """configs/tiny-demo.yaml on this device through the project's stages, as the assets chain them."""
    from transformers import AutoTokenizer

    from lora_pipeline.ml.base.memory import plan_for_config
    from lora_pipeline.ml.base.precision import compute_dtype_name
    from lora_pipeline.ml.base.quantize import quantize_base
    from lora_pipeline.ml.base.tiny import build_tiny_llama, builtin_shape
    from lora_pipeline.ml.data.clean import clean_rows, tokenizer_corpus
    from lora_pipeline.ml.data.formatted import FormatSettings, format_dataset
    from lora_pipeline.ml.data.raw import load_dataset

    bench_env.config_schema_base()
    config, dropped = bench_env.load_config(bench_env.REPO / "configs" / "tiny-demo.yaml", spec.get("demo_overrides", []))
    work, device = Path(spec["work"]) / "demo", _device()
    cleaned = clean_rows(load_dataset(config.dataset), config.dataset.dedupe)
    base = build_tiny_llama(tokenizer_corpus(cleaned, config.dataset.eval_fraction), work / "base",
                            builtin_shape(config.base_model))
    q = config.quantization
    quantize_base(base, work / "quantized", q.mode, q.double_quant, compute_dtype_name(q.compute_dtype, device), device)
    # The fields assets.data.format_settings reads (that module is Dagster's side of the project).
    settings = FormatSettings(template=config.dataset.template, system_prompt=config.dataset.system_prompt,
                              max_length=config.training.max_length, overlong=config.dataset.overlong,
                              eval_fraction=config.dataset.eval_fraction,
                              loss_on_responses_only=config.training.completion_only_loss)
    train = format_dataset(cleaned, AutoTokenizer.from_pretrained(base), settings).train.to_pandas()
    plan = plan_for_config(config, device, local_folder=base)
    compat = bench_env.transformers_compat()
    result = _train_adapter()(work / "quantized", train, work / "adapter", config.lora, config.training, device,
                              config.base_model, **_train_options(config.training, device))
    return {"part": "demo", "status": "ok", "device": device.device, "examples": len(train), "steps": result.steps,
            "train_tokens": result.train_tokens, "tokens_per_s": result.tokens_per_second,
            "train_s": result.train_seconds, "final_loss": result.final_loss, "precision": result.precision,
            "gradient_checkpointing": result.gradient_checkpointing, "dropped_overrides": dropped,
            "step_options": getattr(result, "step_options", None), "compat": compat,
            **_peak_fields(result, plan, device)}


def _random_tokenizer(folder: Path) -> None:
    """A tokenizer with only special tokens: the training data is token ids already, the trainer needs pad/eos."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def _choose_micro_batch(spec: dict, architecture: dict, device) -> tuple[int, bool, list]:
    """The largest micro-batch whose planned peak stays under memory_fraction of the GPU, checkpointing off if any
    fits so; spec['micro_batch'] when given (and on CPUs, where it defaults to 2)."""
    from lora_pipeline.ml.base.memory import plan_memory

    if spec["micro_batch"] or device.device != "cuda":
        return spec["micro_batch"] or 2, bool(spec.get("gradient_checkpointing")), []
    budget = spec["memory_fraction"] * device.gpu_memory_bytes
    tried = []
    for checkpointing in (False, True):
        for batch in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1):
            config, _ = bench_env.load_config(bench_env.REPO / "configs" / "llama-3.1-8b-qlora.yaml",
                                              qlora_overrides({**spec, "gradient_checkpointing": checkpointing},
                                                              batch, "baseline"))
            plan = plan_memory(architecture, config.lora, config.quantization, config.training, device)
            tried.append({"micro_batch": batch, "gradient_checkpointing": checkpointing, "plan_gib": plan.total / GIB})
            if plan.total <= budget:
                return batch, checkpointing, tried
    return 1, True, tried


def part_plan(spec: dict) -> dict:
    """No model: the shape's FLOPs per token and the planner's choice of micro-batch on a GPU of plan_gpu_gib."""
    from lora_pipeline.ml.base.precision import DeviceInfo

    bench_env.config_schema_base()
    fields = {"model_type": "llama", **model_shape(spec), "torch_dtype": "bfloat16"}
    gpu = DeviceInfo(device="cuda", gpu_count=1, bf16_supported=True,
                     gpu_memory_bytes=int(spec["plan_gpu_gib"] * GIB))
    batch, checkpointing, tried = _choose_micro_batch({**spec, "micro_batch": 0}, fields, gpu)
    config, _ = bench_env.load_config(bench_env.REPO / "configs" / "llama-3.1-8b-qlora.yaml",
                                      qlora_overrides(spec, batch, "baseline"))
    flops = lora_flops(LlamaShape.from_config(fields), config.lora.r, [spec["seq_len"]] * batch)
    return {"part": "plan", "status": "ok", "micro_batch": batch, "gradient_checkpointing": checkpointing,
            "batch_plans": tried, "flops": flops.as_dict(),
            "note": f"{spec['plan_gpu_gib']:.0f} GiB GPU: micro-batch {batch} x {spec['seq_len']}, "
                    f"{flops.per_token / 1e9:.2f} GFLOP/token (6N: {flops.six_n / 1e9:.2f})"}


def part_build(spec: dict) -> dict:
    """The 8B-shaped random base (bf16 on GPUs), saved, then NF4-quantized by the project's quantize_base."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_pipeline.ml.base.precision import compute_dtype_name
    from lora_pipeline.ml.base.quantize import quantize_base

    bench_env.config_schema_base()
    work, device = Path(spec["work"]), _device()
    fields = model_shape(spec)
    dtype = torch.bfloat16 if device.device == "cuda" else torch.float32
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if device.device == "cuda" else "cpu"):  # initialise on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "base")
    _random_tokenizer(work / "base")
    del model
    if device.device == "cuda":
        torch.cuda.empty_cache()
    built = time.perf_counter() - started
    config, _ = bench_env.load_config(bench_env.REPO / "configs" / "llama-3.1-8b-qlora.yaml",
                                      qlora_overrides(spec, 1, "baseline"))
    q = config.quantization
    quantized = quantize_base(work / "base", work / "quantized", q.mode, q.double_quant,
                              compute_dtype_name(q.compute_dtype, device), device)
    architecture = json.loads((work / "base" / "config.json").read_text())
    batch, checkpointing, tried = _choose_micro_batch(spec, architecture, device)
    return {"part": "qlora8b-build", "status": "ok", "parameters": parameters, "build_s": built,
            "quantize_s": quantized.load_seconds, "quantized_modules": quantized.quantized_modules,
            "micro_batch": batch, "gradient_checkpointing": checkpointing, "batch_plans": tried,
            "shape": {k: fields[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size")}}


def _random_token_frame(rows: int, seq_len: int, vocab: int, seed: int):
    """rows full-length documents of random token ids, every token labelled (synthetic throughput data)."""
    import numpy as np
    import pandas as pd

    ids = np.random.default_rng(seed).integers(len(SPECIAL_TOKENS), vocab, size=(rows, seq_len), dtype=np.int64)
    return pd.DataFrame({"input_ids": list(ids), "loss_mask": [np.ones(seq_len, dtype=np.int8)] * rows})


def _liger_fallback() -> str:
    """Without training.liger_kernel in the schema: patch transformers' Llama classes globally (this process only)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False)
    return "Liger applied by a global patch (the schema has no training.liger_kernel)"


def _sdpa_context(variant: str):
    if VARIANTS[variant].get("sdpa") != "flash":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def part_qlora(spec: dict, variant: str) -> dict:
    """train_adapter on the quantized 8B-shaped base with one variant; throughput, MFU and peak vs the plan."""
    from lora_pipeline.ml.base.memory import plan_memory

    bench_env.config_schema_base()
    work, device, batch = Path(spec["work"]), _device(), spec["micro_batch"]
    config, dropped = bench_env.load_config(bench_env.REPO / "configs" / "llama-3.1-8b-qlora.yaml",
                                            qlora_overrides(spec, batch, variant))
    record = {"part": "qlora8b", "variant": variant, "about": VARIANTS[variant]["about"], "micro_batch": batch,
              "seq_len": spec["seq_len"], "layers": spec["layers"], "dropped_overrides": dropped}
    needed = {o.split("=")[0] for o in VARIANTS[variant]["set"]} - {"training.liger_kernel"}
    missing = sorted(key for key in needed if any(o.startswith(key + "=") for o in dropped))
    if missing:
        return {**record, "status": "skipped", "reason": f"the config schema has no {', '.join(missing)}"}
    compat = bench_env.transformers_compat()
    notes = [_liger_fallback()] if "training.liger_kernel=true" in dropped else []
    architecture = json.loads((work / "base" / "config.json").read_text())
    plan = plan_memory(architecture, config.lora, config.quantization, config.training, device)
    train = _random_token_frame(batch * spec["steps"], spec["seq_len"], architecture["vocab_size"], seed=1)
    step_times: list[tuple[int, float]] = []
    with _sdpa_context(variant):
        result = _train_adapter()(work / "quantized", train, work / f"adapter-{variant}", config.lora,
                                  config.training, device, "random-llama-3.1-8b-shape",
                                  progress=lambda event: step_times.append((int(event["step"]), time.perf_counter())),
                                  **_train_options(config.training, device))
    # PEFT's "all-linear" (a string) adapts all seven projections of a Llama, as the list does.
    targets = result.target_modules if isinstance(result.target_modules, list) else LLAMA_PROJECTIONS
    flops = lora_flops(LlamaShape.from_config(architecture), config.lora.r, [spec["seq_len"]] * batch, targets)
    steady = steady_tokens_per_second(step_times, batch * spec["seq_len"], spec["warmup_steps"])
    rate = steady or result.tokens_per_second
    record.update(status="ok", steps=result.steps, tokens_per_s=result.tokens_per_second,
                  steady_tokens_per_s=steady or None, train_s=result.train_seconds, final_loss=result.final_loss,
                  gradient_checkpointing=result.gradient_checkpointing, precision=result.precision,
                  flops=flops.as_dict(), peak_tflops=spec["peak_tflops"],
                  achieved_tflops=flops.per_token * rate / 1e12,
                  mfu=mfu(flops.per_token, rate, spec["peak_tflops"]),
                  mfu_6n=mfu(flops.six_n, rate, spec["peak_tflops"]),
                  step_options=getattr(result, "step_options", None), note="; ".join(notes) or None, compat=compat,
                  **_peak_fields(result, plan, device))
    return record


def run_part(part: str, spec: dict, variant: str | None) -> dict:
    """The part's record; a failure becomes a record too (with the error, and oom marked), never a lost line."""
    started = time.perf_counter()
    try:
        bench_env.enter_repo()
        if part == "qlora":
            record = part_qlora(spec, variant or "baseline")
        else:
            parts = {"environment": part_environment, "plan": part_plan, "demo": part_demo, "build": part_build}
            record = parts[part](spec)
    except BaseException as error:  # report everything, even SystemExit from a library, as this part's failure
        traceback.print_exc()
        text = f"{type(error).__name__}: {error}"
        record = {"part": {"qlora": "qlora8b", "build": "qlora8b-build"}.get(part, part), "status": "failed",
                  "error": text[:2000], "oom": "out of memory" in text.lower() or "OutOfMemory" in text}
        if variant:
            record.update(variant=variant, micro_batch=spec.get("micro_batch"))
    record["wall_s"] = time.perf_counter() - started
    return with_derived(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("environment", "plan", "demo", "build", "qlora"))
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="qlora only: which settings to train with")
    parser.add_argument("--spec", required=True, help="the run's settings as JSON (gpu_bench.py writes it)")
    args = parser.parse_args()
    record = run_part(args.part, json.loads(args.spec), args.variant)
    sys.stdout.flush()
    print(result_line(record), flush=True)


if __name__ == "__main__":
    main()
