"""What a SIGKILL costs: an uninterrupted run against a run killed after its first checkpoints and relaunched.

    python bench/crash_resume.py [--steps 40] [--checkpoint-every 5] [--quantization nf4|none]

Both train the micro built-in model on the bundled sample with the CLI, each on its own store. It
prints the steps each ended with, the step the relaunch resumed from, the last logged losses and
whether the two adapters are identical, then relaunches once more to show the finished adapter is
reused, not retrained.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "lora_pipeline" / "data" / "sample_instructions.json"


def _config(steps: int, checkpoint_every: int, quantization: str) -> dict:
    return {
        "base_model": "builtin:micro-llama",
        "dataset": {"source": str(SAMPLE), "format": "alpaca", "eval_fraction": 0.15, "max_rows": 160},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"mode": quantization},
        "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 3e-3, "max_length": 96,
                     "logging_steps": 2, "warmup": 0.0, "checkpoint_every": checkpoint_every},
        "eval": {"max_examples": 16, "batch_size": 8, "samples": 2, "max_new_tokens": 8},
    }


def _command(config: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "lora_pipeline.cli", "run", str(config), "--storage", str(store), "--json"]


def _adapter(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])["assets"]["trained_adapter"]["metadata"]


def _weights_sha(store: Path) -> str:
    ref = json.loads((store / "micro" / "trained_adapter" / "CURRENT.json").read_text())
    manifest = json.loads((Path(ref["uri"]) / "MANIFEST.json").read_text())
    return next(entry["sha256"] for entry in manifest["files"] if entry["path"] == "adapter_model.safetensors")


def _last_losses(store: Path) -> list:
    ref = json.loads((store / "micro" / "trained_adapter" / "CURRENT.json").read_text())
    return json.loads((Path(ref["uri"]) / "training_summary.json").read_text())["loss_history"][-2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the run (default 40)")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints (default 5)")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"], help="base quantization")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crash-resume-"))
    config = work / "micro.yaml"
    config.write_text(yaml.safe_dump(_config(args.steps, args.checkpoint_every, args.quantization)))
    env = {**os.environ, "DAGSTER_HOME": str(work / "dagster")}
    whole, crashed = work / "uninterrupted", work / "crashed"

    started = time.perf_counter()
    reference = subprocess.run(_command(config, whole), cwd=REPO, env=env, capture_output=True, text=True, check=True)
    print(f"uninterrupted: {_adapter(reference.stdout)['steps']} steps, {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    victim = subprocess.Popen(_command(config, crashed), cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = str(crashed / "micro" / "trained_adapter" / ".checkpoints" / "*" / "step-*" / "MANIFEST.json")
    while victim.poll() is None and not glob.glob(pattern):
        time.sleep(0.05)
    time.sleep(1.5)  # into the next interval: the work a crash loses
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    saved = sorted(int(Path(p).parent.name.removeprefix("step-")) for p in glob.glob(pattern))
    print(f"SIGKILL after {time.perf_counter() - started:.1f} s; complete checkpoints at steps {saved}")

    started = time.perf_counter()
    relaunch = subprocess.run(_command(config, crashed), cwd=REPO, env=env, capture_output=True, text=True, check=True)
    resumed = _adapter(relaunch.stdout)
    print(f"relaunch: resumed from step {resumed['resumed_from_step']}, ended at {resumed['steps']} steps, "
          f"{time.perf_counter() - started:.1f} s")
    print(f"last logged losses: uninterrupted {_last_losses(whole)}, resumed {_last_losses(crashed)}")
    print(f"adapter weights identical: {_weights_sha(whole) == _weights_sha(crashed)}")

    started = time.perf_counter()
    again = subprocess.run(_command(config, crashed), cwd=REPO, env=env, capture_output=True, text=True, check=True)
    print(f"third launch: adapter reused={_adapter(again.stdout)['reused']}, {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
