"""GPU benchmark of the project's LoRA / QLoRA training, made to run once, unattended, on a lent GPU machine.

Parts, each in its own process (bench_parts.py) so one failure loses nothing else, each printing a JSON line:
  1. environment: versions, the GPU, attention kernels, a bf16 matmul's rate, how the config schema loaded
  2. demo: configs/tiny-demo.yaml trained on this device through the project's code (tokens/s, seconds, peak)
  3. qlora8b: a Llama-3.1-8B-shaped model with fewer layers (random weights built here, no download), NF4 via
     bitsandbytes, LoRA r16 on all seven projections, 2048-token rows, bf16, the largest micro-batch the project's
     memory planner fits without gradient checkpointing; tokens/s, MFU (4N + adapters + causal attention) and
     TRL's 6N figure, the measured peak against the planner's estimate
  4. the same with Liger's kernels, per-document (varlen Flash) attention, the dequantization cache, all
     together, and SDPA held to its Flash backend (variants the config schema cannot express are skipped)
Records go to OUT/gpu_results.json (rewritten after every part), the table to OUT/gpu_summary.txt, the whole
output to OUT/gpu_bench.log; the table is also printed last. A time budget stops starting parts that would not
finish, so the results of the parts that ran are always written.

usage: python bench/gpu/gpu_bench.py [--out DIR] [--layers 4] [--variants baseline,liger] [--dry-run] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flop_count import H200_DENSE_BF16_TFLOPS
from result_table import parse_result_lines, result_line, results_document, summary_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_VARIANTS = ("baseline", "liger", "per_document", "dequant_cache", "all", "flash_sdpa")
# Seconds a part needs at least (imports, loading, a few steps): one with less budget left is skipped, not cut off.
LEAST_SECONDS = {"environment": 40, "plan": 30, "demo": 60, "build": 120, "qlora": 60}
PART_NAMES = {"build": "qlora8b-build", "qlora": "qlora8b"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench" / "results" / "gpu"),
                        help="where gpu_results.json, gpu_summary.txt and gpu_bench.log go (default: $OUT, else "
                             "bench/results/gpu)")
    parser.add_argument("--parts", default="demo,qlora", help="comma list of demo, qlora (default both; the "
                        "environment record is always taken)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"qlora variants in the order to run (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-shaped model (default 4)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="rows per micro-batch; 0 (default): the largest the memory planner fits")
    parser.add_argument("--memory-fraction", type=float, default=0.85,
                        help="share of the GPU's memory the planned peak may take when choosing the micro-batch")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per qlora variant (default 12)")
    parser.add_argument("--warmup-steps", type=int, default=4,
                        help="steps left out of the steady tokens/s (first-step and allocator costs; default 4)")
    parser.add_argument("--peak-tflops", type=float, default=H200_DENSE_BF16_TFLOPS,
                        help=f"the GPU's dense bf16 peak for MFU (default {H200_DENSE_BF16_TFLOPS:g}, H200 SXM)")
    parser.add_argument("--budget-s", type=float, default=560,
                        help="wall-clock seconds for the whole run; parts that would not fit are skipped (default 560)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the qlora runs' config (configs/llama-3.1-8b-qlora.yaml), e.g. "
                             "lora.dropout=0; values are YAML, so quote on/off: 'training.gradient_checkpointing=\"on\"'")
    parser.add_argument("--demo-set", dest="demo_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the demo config, e.g. training.max_steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="no training: the environment, FLOPs per token and the planner's micro-batch on a "
                             "--plan-gpu-gib GPU (runs anywhere, in seconds)")
    parser.add_argument("--plan-gpu-gib", type=float, default=139.0, help="GPU memory the dry run plans for")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model, short rows and few steps: checks every code path on a CPU in minutes")
    parser.add_argument("--work", type=Path, help="scratch folder for the models (default: a new temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="leave the scratch folder (models, adapters) behind")
    args = parser.parse_args(argv)
    if args.tiny:  # small everything, unless set explicitly
        defaults = parser.parse_args([])
        for name, value in (("layers", 2), ("seq_len", 128), ("micro_batch", 2), ("steps", 4), ("warmup_steps", 1)):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
        if not any(o.startswith("training.max_steps=") for o in args.demo_overrides):
            args.demo_overrides.append("training.max_steps=4")
    return args


def spec_of(args: argparse.Namespace, work: Path) -> dict:
    """What every part reads: the run's settings, as JSON-able data."""
    return {"tiny": args.tiny, "layers": args.layers, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "peak_tflops": args.peak_tflops,
            "memory_fraction": args.memory_fraction, "overrides": args.overrides,
            "demo_overrides": args.demo_overrides, "plan_gpu_gib": args.plan_gpu_gib, "work": str(work),
            "gradient_checkpointing": False}


def child_environment(work: Path) -> dict:
    """Offline everywhere (the machine has no network), unbuffered output, caches in the scratch folder."""
    # PyTorch's allocator is left at its defaults: expandable segments would need the driver's virtual-memory
    # calls, which a sandboxed GPU may not offer, and the planner's 85% budget leaves room for fragmentation.
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(work / "hf-datasets"))


class Runner:
    """Runs parts as child processes within the time budget, echoing and logging their output, keeping records."""

    def __init__(self, args: argparse.Namespace, spec: dict, log):
        self.args, self.spec, self.log = args, spec, log
        self.deadline = time.monotonic() + args.budget_s
        self.records: list[dict] = []
        self.env = child_environment(Path(spec["work"]))

    def emit(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, part: str, variant: str | None = None) -> dict:
        """One part's record: from its output, or saying why there is none (skipped, timeout, crash)."""
        name = {"part": PART_NAMES.get(part, part), **({"variant": variant} if variant else {})}
        left = self.deadline - time.monotonic()
        if left < LEAST_SECONDS[part]:
            record = {**name, "status": "skipped", "reason": f"time budget: {left:.0f} s left, needs ~{LEAST_SECONDS[part]}"}
            self.emit(result_line(record))
        else:
            record = self._child(part, variant, name, timeout=left - 5)
        self.records.append(record)
        self.save()
        return record

    def _child(self, part: str, variant: str | None, name: dict, timeout: float) -> dict:
        command = [sys.executable, str(HERE / "bench_parts.py"), part, "--spec", json.dumps(self.spec)]
        command += ["--variant", variant] if variant else []
        self.emit(f"=== {name['part']}{':' + variant if variant else ''} (up to {timeout:.0f} s)")
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        timed_out = threading.Event()

        def stop():  # the child and whatever it started (its own session), nothing else
            timed_out.set()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, stop)
        timer.start()
        lines = []
        try:
            for line in process.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                self.emit(line)
        finally:
            timer.cancel()
            code = process.wait()
        found = parse_result_lines(lines)
        if found:
            return found[-1]
        status = "timeout" if timed_out.is_set() else "failed"
        tail = " | ".join(line for line in lines[-6:] if line.strip())
        record = {**name, "status": status, "error": f"exit code {code} after {time.monotonic() - started:.0f} s: {tail}"[:2000]}
        self.emit(result_line(record))
        return record

    def save(self) -> None:
        """Rewrite the results after every part, so a run cut short still leaves what it measured."""
        (self.args.out / "gpu_results.json").write_text(json.dumps(results_document(self.records), indent=2, default=str))
        (self.args.out / "gpu_summary.txt").write_text(summary_table(self.records) + "\n")


def run_qlora(runner: Runner, variants: list[str]) -> None:
    """Build the 8B-shaped base, then each variant at the micro-batch the build chose (halved once if it runs out)."""
    build = runner.run("build")
    if build.get("status") != "ok":
        return
    runner.spec.update(micro_batch=build["micro_batch"], gradient_checkpointing=build["gradient_checkpointing"])
    for variant in variants:
        record = runner.run("qlora", variant)
        if record.get("oom") and runner.spec["micro_batch"] > 1:
            runner.spec["micro_batch"] //= 2
            runner.emit(f"{variant} ran out of memory: again at micro-batch {runner.spec['micro_batch']}")
            runner.run("qlora", variant)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="lora-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    with open(args.out / "gpu_bench.log", "w") as log:
        runner = Runner(args, spec_of(args, work), log)
        runner.emit(f"lora-pipeline GPU bench: python {sys.version.split()[0]} at {sys.executable}; work {work}; "
                    f"out {args.out}; budget {args.budget_s:.0f} s")
        try:
            runner.run("environment")
            parts = [p for p in args.parts.split(",") if p]
            if args.dry_run:
                runner.run("plan")
            else:
                if "demo" in parts:
                    runner.run("demo")
                if "qlora" in parts:
                    run_qlora(runner, variants)
        finally:
            if not args.keep_work and not args.work:
                shutil.rmtree(work, ignore_errors=True)
            runner.save()
            runner.emit("\n" + summary_table(runner.records))
            runner.emit(f"results: {args.out / 'gpu_results.json'}")


if __name__ == "__main__":
    main()
