"""The memory planner against measured peaks: real CPU trainings of the built-in models.

Builds the micro and tiny built-in models (plus a wider one of the same family, so the weights weigh
something, and a randomly initialised model of openai-community/gpt2's shape with the built-in
tokenizer), quantizes them, formats the bundled sample data as formatted_dataset does, then trains a
few steps per case in a fresh subprocess with lora_pipeline.ml.training.train_adapter. The measured peak is
what the trainer records on CPU (process peak RSS); the estimate is lora_pipeline.ml.base.memory.plan_memory
from the model folder's config.json. Cases use packing, so every batch really holds batch x max_length
tokens (the planner's worst case), except the padded one, whose examples are cut at max_length.

Every torch-importing step runs in a subprocess: a process inherits its parent's resident size into
its own ru_maxrss (Linux copies the parent's high-water mark at fork), so this parent stays small.

usage: python bench/memory_plan.py [--steps 3] [--only NAME ...] [--baseline] [--live]
  --baseline  also measure the process baseline (micro model, 1 x 32 tokens) that
              CPU_PROCESS_BASELINE_BYTES holds
  --live      train with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns freed blocks at once and the
              peak is the live memory: compared with the plan without its allocator margin
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "lora_pipeline" / "data" / "sample_instructions.json"
MIB = 1024**2

# name: (model, quantization, batch, max_length, packing, gradient checkpointing, lora dropout)
CASES = {
    "micro-nf4-8x128": ("micro-llama", "nf4", 8, 128, True, "off", 0.0),
    "micro-none-8x512": ("micro-llama", "none", 8, 512, True, "off", 0.0),
    "tiny-nf4-4x256": ("tiny-llama", "nf4", 4, 256, True, "off", 0.0),
    "tiny-nf4-8x384": ("tiny-llama", "nf4", 8, 384, True, "off", 0.0),
    "tiny-none-4x768": ("tiny-llama", "none", 4, 768, True, "off", 0.0),
    "tiny-none-4x512-checkpointing": ("tiny-llama", "none", 4, 512, True, "on", 0.0),
    "tiny-none-32x32-padded-dropout": ("tiny-llama", "none", 32, 32, False, "off", 0.05),
    "wide-nf4-2x256": ("wide-llama", "nf4", 2, 256, True, "off", 0.0),
    "wide-none-2x256": ("wide-llama", "none", 2, 256, True, "off", 0.0),
    "gpt2-none-2x256": ("gpt2-shape", "none", 2, 256, True, "off", 0.0),
}
BASELINE_CASE = ("micro-llama", "nf4", 1, 32, True, "off", 0.0)


def settings(case: tuple, steps: int):
    """The config sections of a case."""
    from lora_pipeline.config.schema import LoraSettings, QuantizationSettings, TrainingSettings

    _, mode, batch, length, packing, checkpointing, dropout = case
    return (LoraSettings(r=8, alpha=16, dropout=dropout), QuantizationSettings(mode=mode, compute_dtype="float32"),
            TrainingSettings(max_steps=steps, batch_size=batch, max_length=length, packing=packing,
                             gradient_checkpointing=checkpointing, learning_rate=1e-3, warmup=0.0, logging_steps=1000,
                             checkpoint_every=0))


def worker(spec: dict) -> None:
    """Train one case in this fresh process and print the peak the trainer measured (JSON, last line)."""
    import pandas as pd

    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.training import train_adapter

    lora, _, training = settings(tuple(spec["case"]), spec["steps"])
    train = pd.read_parquet(spec["train"])
    result = train_adapter(Path(spec["base"]), train, Path(spec["out"]), lora, training, DeviceInfo(device="cpu"),
                           "bench")
    high_water = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"peak_bytes": result.peak_memory_bytes, "high_water_bytes": high_water, "steps": result.steps}))


def prepare(work: Path, lengths: dict[str, list[int]]) -> None:
    """Build, quantize and format what the cases need under work/."""
    from transformers import AutoTokenizer

    from lora_pipeline.config.schema import DatasetSettings
    from lora_pipeline.ml.data.clean import clean_rows, tokenizer_corpus
    from lora_pipeline.ml.data.formatted import FormatSettings, format_dataset
    from lora_pipeline.ml.data.raw import load_dataset
    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.base.quantize import quantize_base
    from lora_pipeline.ml.base.tiny import BUILTIN_MODELS, TinyLlamaShape, build_tiny_llama

    shapes = {**BUILTIN_MODELS, "wide-llama": TinyLlamaShape(hidden_size=1024, layers=8, vocab_size=4096)}
    cleaned = clean_rows(load_dataset(DatasetSettings(source=str(SAMPLE))))
    corpus = tokenizer_corpus(cleaned, 0.1)
    for model in sorted(lengths):
        if model == "gpt2-shape":
            base = build_gpt2_shape(work / "micro-tokenizer", work / model / "none", corpus)
        else:
            base = build_tiny_llama(corpus, work / model / "none", shapes[model])
            quantize_base(base, work / model / "nf4", "nf4", True, "float32", DeviceInfo(device="cpu"))
        tokenizer = AutoTokenizer.from_pretrained(base)
        for length in sorted(set(lengths[model])):
            formatted = format_dataset(cleaned, tokenizer, FormatSettings(max_length=length, eval_fraction=0.1))
            formatted.train.to_pandas().to_parquet(work / model / f"train-{length}.parquet")


def build_gpt2_shape(tokenizer_dir: Path, out: Path, corpus: list[str]) -> Path:
    """A randomly initialised GPT-2 of openai-community/gpt2's shape (GPT2Config's defaults), with the built-in
    tokenizer (its ids all fall inside GPT-2's vocabulary); GPT-2 has no layer width the CPU 4-bit kernel runs."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lora_pipeline.ml.base.tiny import BUILTIN_MODELS, build_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llama(corpus, tokenizer_dir, BUILTIN_MODELS["micro-llama"]))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def measure(work: Path, case: tuple, steps: int, live: bool) -> int:
    """Peak bytes of one case trained in a fresh subprocess."""
    model, mode, _, length, *_ = case
    spec = {"case": list(case), "steps": steps, "base": str(work / model / mode),
            "train": str(work / model / f"train-{length}.parquet"), "out": str(work / "out" / str(time.time_ns()))}
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live else {})}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, env=env)
    if done.returncode:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    if measured["peak_bytes"] > 1.05 * measured["high_water_bytes"]:
        print(f"  note: ru_maxrss {measured['peak_bytes'] / MIB:.0f} MiB exceeds this process's own high-water mark "
              f"{measured['high_water_bytes'] / MIB:.0f} MiB")
    return measured["peak_bytes"]


def estimate(work: Path, case: tuple, steps: int):
    """The planner's plan for a case, from the built model's config.json."""
    from lora_pipeline.ml.base.memory import architecture_config, plan_memory
    from lora_pipeline.ml.base.precision import DeviceInfo

    model, mode, *_ = case
    lora, quantization, training = settings(case, steps)
    config = architecture_config(str(work / model / mode))
    return plan_memory(config, lora, quantization, training, DeviceInfo(device="cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    parser.add_argument("--baseline", action="store_true", help="also measure the process baseline")
    parser.add_argument("--live", action="store_true", help="glibc returns freed memory: compare live memory")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.prepare:
        return prepare(Path(args.prepare[0]), json.loads(args.prepare[1]))

    from lora_pipeline.ml.base.memory import CPU_PROCESS_BASELINE_BYTES

    cases = {name: CASES[name] for name in (args.only or CASES)}
    if args.baseline:
        cases = {"baseline-micro-1x32": BASELINE_CASE, **cases}
    lengths: dict[str, list[int]] = {}
    for model, _, _, length, *_ in cases.values():
        lengths.setdefault(model, []).append(length)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-memory-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, __file__, "--prepare", str(work), json.dumps(lengths)], check=True,
                       capture_output=True, cwd=REPO)
        print(f"{'case':<34}{'estimate':>10}{'measured':>10}{'error':>8}   activations  loss head  weights (MiB)"
              "  seconds")
        errors = []
        for name, case in cases.items():
            case_started = time.perf_counter()
            plan, peak = estimate(work, case, args.steps), measure(work, case, args.steps, args.live)
            planned = plan.total - plan.allocator_margin if args.live else plan.total
            error = (planned - peak) / peak * 100
            if name.startswith("baseline"):
                own = plan.total - plan.framework - plan.allocator_margin
                print(f"{name:<34}{planned / MIB:>10.0f}{peak / MIB:>10.0f}{error:>+7.1f}%   process baseline "
                      f"measured {(peak - own) / MIB:.0f} MiB (CPU_PROCESS_BASELINE_BYTES: "
                      f"{CPU_PROCESS_BASELINE_BYTES / MIB:.0f} MiB)")
                continue
            errors.append(abs(error))
            print(f"{name:<34}{planned / MIB:>10.0f}{peak / MIB:>10.0f}{error:>+7.1f}%   "
                  f"{plan.activations / MIB:>11.0f}{plan.loss_head / MIB:>11.0f}{plan.base_weights / MIB:>9.0f}"
                  f"{time.perf_counter() - case_started:>9.0f}")
    if errors:
        print(f"{len(errors)} cases, {args.steps} steps each: mean |error| {sum(errors) / len(errors):.1f}%, "
              f"max {max(errors):.1f}%, {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
