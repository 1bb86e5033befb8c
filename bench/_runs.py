"""Plumbing shared by the parity benchmarks: the tiny base, measured runs, and reading each tool's figures.

Every tool runs as a child process under `/usr/bin/time -v` while this process samples the RSS of
the child's whole process tree, so wall time and peak memory are measured the same way, from the
outside, for every tool (imports and model loading included), whatever the tool says about itself.
The parsers take text, not files, so the tests can feed them sample outputs.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "alpaca_en_demo.json"
SHARED_BENCH = SHARED / "bench"
GNU_TIME = Path("/usr/bin/time")
PIPELINE_CONFIG = "configs/bench/recipe-parity.yaml"
SAMPLE_EVERY_S = 0.2
# Above this share of the machine's CPU time taken by other processes during a run, its times are flagged.
CONTENDED_SHARE = 0.10


class RunFailed(RuntimeError):
    """A benchmarked command exited non-zero; the message ends with the tail of its stderr."""


@dataclass
class Measured:
    """One command's outside view: wall time, output, and peak memory two ways."""

    wall_s: float
    stdout: str
    stderr: str
    max_process_rss_mb: float  # the kernel's high-water mark of the largest single process (time -v)
    sampled_tree_rss_mb: float  # the largest sum over the process tree seen by sampling (time -v's ~2 MB included)
    cpu_s: float | None = None  # user + system seconds of the tree (time -v)
    machine_busy_s: float | None = None  # CPU seconds the whole machine was busy meanwhile (all users, steal included)

    @property
    def peak_rss_mb(self) -> float:
        # Both are lower bounds of the tree's true peak: the exact per-process mark misses concurrent
        # children, the sampled sum misses spikes between samples. The larger is the honest figure.
        return max(self.max_process_rss_mb, self.sampled_tree_rss_mb)


def parse_time_verbose(stderr: str) -> dict:
    """Figures from the report `/usr/bin/time -v` appends to stderr: peak RSS (MB), elapsed s, exit status."""
    rss = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", stderr)
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", stderr)
    status = re.search(r"Exit status:\s*(-?\d+)", stderr)
    cpu = [re.search(rf"{kind} time \(seconds\):\s*([\d.]+)", stderr) for kind in ("User", "System")]
    seconds = None
    if elapsed:
        seconds = 0.0
        for part in elapsed.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return {
        "max_rss_mb": int(rss.group(1)) / 1024 if rss else None,
        "elapsed_s": seconds,
        "exit_status": int(status.group(1)) if status else None,
        "cpu_s": sum(float(match.group(1)) for match in cpu) if all(cpu) else None,
    }


def _tree_rss_bytes(root) -> int:
    import psutil

    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass  # exited between listing and reading
    return total


def _machine_busy_s() -> float:
    import psutil

    times = psutil.cpu_times()  # seconds summed over all cores; guest time is already inside user
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))


def run_measured(command: list[str], log_prefix: Path, env: dict | None = None, cwd: Path = REPO) -> Measured:
    """Run command to completion under /usr/bin/time -v, sampling its tree's RSS; raise RunFailed on failure.

    stdout and stderr go to files beside log_prefix (pipes could fill and stall the child while
    this loop sleeps), and are kept there for a look after the run.
    """
    import psutil

    log_prefix.parent.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = Path(f"{log_prefix}.stdout"), Path(f"{log_prefix}.stderr")
    timed = [str(GNU_TIME), "-v", *command] if GNU_TIME.exists() else command
    started, busy_before = time.perf_counter(), _machine_busy_s()
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        child = subprocess.Popen(timed, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        root = psutil.Process(child.pid)
        tree_peak = 0
        while child.poll() is None:
            tree_peak = max(tree_peak, _tree_rss_bytes(root))
            time.sleep(SAMPLE_EVERY_S)
    wall, machine_busy = time.perf_counter() - started, _machine_busy_s() - busy_before
    out, err = stdout_path.read_text(), stderr_path.read_text()
    if child.returncode != 0:
        raise RunFailed(f"exit {child.returncode}: {' '.join(command)}\n(logs: {log_prefix}.*)\n{err[-3000:]}")
    time_figures = parse_time_verbose(err)
    return Measured(wall, out, err, time_figures["max_rss_mb"] or 0.0, tree_peak / 2**20, time_figures["cpu_s"],
                    machine_busy)


def build_tiny_base(work: Path) -> Path:
    """The shared tiny Llama (random weights, BPE trained on the corpus), built once per invocation."""
    base = work / "tinybase"
    run_measured([sys.executable, str(SHARED_BENCH / "make_tiny_base.py"), str(DATA), str(base)], work / "logs" / "tinybase")
    return base


def code_state() -> dict:
    """The commit and the uncommitted changes under lora_pipeline/, as measured: the code may move between runs."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else f"(git failed: {done.stderr.strip()})"

    return {"commit": git("log", "-1", "--oneline"), "status": git("status", "--short", "lora_pipeline").splitlines()}


def others_share(cpu_s: float | None, machine_busy_s: float | None, wall_s: float, cores: int | None) -> float | None:
    """The fraction of the machine's CPU capacity that other processes used while a run was measured.

    The machines here are shared: a run that met other work is slower for reasons of its own, and its
    time is not comparable with a run that had the CPUs to itself.
    """
    if cpu_s is None or machine_busy_s is None or not cores or wall_s <= 0:
        return None
    return max(0.0, machine_busy_s - cpu_s) / (wall_s * cores)


def finish_record(measured: Measured, figures: dict) -> dict:
    """A run's record: the tool's own figures plus the outside measurements and time outside training."""
    return {
        **figures,
        "wall_s": measured.wall_s,
        "outside_training_s": measured.wall_s - figures["train_s"],
        "peak_rss_mb": measured.peak_rss_mb,
        "max_process_rss_mb": measured.max_process_rss_mb,
        "sampled_tree_rss_mb": measured.sampled_tree_rss_mb,
        "cpu_s": measured.cpu_s,
        "machine_busy_s": measured.machine_busy_s,
        "others_cpu_share": others_share(measured.cpu_s, measured.machine_busy_s, measured.wall_s, os.cpu_count()),
    }


# --- the pipeline ---------------------------------------------------------------------------------

def pipeline_command(base: Path, no_quant: bool) -> list[str]:
    command = [
        sys.executable, "-m", "lora_pipeline.cli", "run", PIPELINE_CONFIG,
        "--select", "+trained_adapter", "--set", f"base_model={base}", "--set", f"dataset.source={DATA}", "--json",
    ]
    if no_quant:
        # The recipe's --no-quant variant: no quantization and plain AdamW.
        command += ["--set", "quantization.mode=none", "--set", "training.optimizer=adamw_torch"]
    return command


def parse_pipeline_output(stdout: str) -> dict:
    """Figures from the trained_adapter metadata in the last stdout line of `run --json`.

    Its tokens_per_second counts real tokens: the attention mask's (or, padding-free, the document
    boundaries') non-pad positions of every training batch, and pad_fraction says how much padding the
    batches carried beside them; train_tokens are the lengths of TRL's packed rows, which hold no padding.
    """
    meta = json.loads(stdout.strip().splitlines()[-1])["assets"]["trained_adapter"]["metadata"]
    return {
        "train_loss": float(meta["train_loss"]),
        "final_logged_loss": float(meta["final_logged_loss"]) if "final_logged_loss" in meta else None,
        "train_s": float(meta["train_seconds"]),
        "train_tokens": int(meta["train_tokens"]),
        "tokens_per_s": float(meta["tokens_per_second"]),
        "own_peak_mb": float(meta["peak_memory_mb"]),
        "steps": meta.get("steps"),
        "pad_fraction": meta.get("pad_fraction"),
        "settings": {key: meta.get(key) for key in ("precision", "gradient_checkpointing", "trainable_dtype")},
    }


def run_pipeline(base: Path, work: Path, no_quant: bool) -> dict:
    """raw data -> adapter through the CLI, in a fresh store and Dagster instance, so nothing is reused."""
    (work / "dagster").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(work / "dagster"), "LORA_PIPELINE_STORAGE": str(work / "store")}
    state = code_state()
    measured = run_measured(pipeline_command(base, no_quant), work / "pipeline", env)
    return {**finish_record(measured, parse_pipeline_output(measured.stdout)), "code": state}


# --- the reference recipe -------------------------------------------------------------------------

def recipe_command(base: Path, out: Path, no_quant: bool) -> list[str]:
    command = [sys.executable, str(SHARED_BENCH / "reference_recipe.py"), str(base), str(DATA), str(out)]
    return command + (["--no-quant"] if no_quant else [])


def parse_recipe_output(stdout: str) -> dict:
    """Figures from the recipe's one JSON line (its train_tokens are its packed rows' lengths: real tokens)."""
    figures = json.loads(stdout.strip().splitlines()[-1])
    return {
        "train_loss": float(figures["train_loss"]),
        "final_logged_loss": None,  # the recipe prints only the epoch's mean loss
        "train_s": float(figures["train_runtime_s"]),
        "train_tokens": int(figures["train_tokens"]),
        "tokens_per_s": float(figures["tokens_per_s"]),
        "own_peak_mb": float(figures["peak_rss_mb"]),
    }


def run_recipe(base: Path, work: Path, no_quant: bool) -> dict:
    measured = run_measured(recipe_command(base, work / "out", no_quant), work / "recipe")
    return finish_record(measured, parse_recipe_output(measured.stdout))


def require_bench_inputs(lf_venv: Path, skip_peer: bool) -> None:
    """Exit naming what is missing: the shared data beside the checkout, LLaMA-Factory's venv (unless skipped)."""
    if not DATA.exists():
        sys.exit(f"{DATA} not found: the shared folder must sit beside the checkout")
    if not skip_peer and not (lf_venv / "bin" / "llamafactory-cli").exists():
        sys.exit(f"no llamafactory-cli in {lf_venv}: install it (../shared/bench/peers/README.md), "
                 "pass --lf-venv, or run with --skip-peer")


@dataclass
class ToolMedians:
    """Per tool: the medians of its figures, the runs they came from, and a line for each run left aside."""

    medians: dict[str, dict]
    used: dict[str, list[dict]]
    contended: list[str]
    failed: list[str]


def quiet_medians(records: dict[str, list[dict]], figures: tuple[str, ...]) -> ToolMedians:
    """Medians per tool over its runs without an "error"; a run that shared the machine (others' CPU share above
    CONTENDED_SHARE) is left out when the tool has a quiet one: a run slowed by someone else's work says nothing
    about the tool. Tools without a usable run have no medians."""
    def contended(run: dict) -> bool:
        return (run.get("others_cpu_share") or 0.0) > CONTENDED_SHARE

    def median(values: list) -> float | None:
        present = [value for value in values if value is not None]
        return statistics.median(present) if present else None

    result = ToolMedians({}, {}, [], [])
    for tool, runs in records.items():
        good = [run for run in runs if "error" not in run]
        quiet = [run for run in good if not contended(run)]
        used = quiet or good
        for index, run in enumerate(runs):
            if "error" in run:
                result.failed.append(f"{tool} run {index + 1}: {run['error'].splitlines()[0]}")
            elif contended(run):
                fate = "left out of the medians" if quiet else "kept: no quiet run of this tool"
                result.contended.append(f"{tool} run {index + 1}: other processes took {run['others_cpu_share']:.0%} "
                                        f"of the CPUs ({fate})")
        if used:
            result.medians[tool] = {figure: median([run.get(figure) for run in used]) for figure in figures}
            result.medians[tool]["runs"] = len(used)
            result.used[tool] = used
    return result
