"""What a training run reports as it goes and measures at the end: progress, checkpoints, peak memory."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

from lora_pipeline.ml.base.precision import DeviceInfo

ProgressFn = Callable[[dict], None]
CheckpointFn = Callable[[Path, int], None]
LogFn = Callable[[int, dict], None]  # (optimizer step, the Trainer's logs): an experiment tracker


def reset_peak_memory(device: DeviceInfo) -> None:
    """Start the peak measurement now, so earlier stages in this process (quantization) do not count."""
    if device.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current resident size
    except OSError:
        pass  # elsewhere the process's lifetime peak is what there is


def peak_memory_bytes(device: DeviceInfo) -> tuple[int, str]:
    if device.device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    try:
        status = Path("/proc/self/status").read_text()
        peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return peak_kib * 1024, "process_peak_rss"
    except (OSError, StopIteration, ValueError):
        # ru_maxrss is in KiB on Linux, and starts from the parent's size in a child process.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def progress_line(progress: dict) -> str:
    """One progress report in words, as the run log shows it."""
    if "eval_loss" in progress:
        return (f"step {progress['step']}/{progress['max_steps']} held-out loss {progress['eval_loss']:.4f} "
                "(per-example mean)")
    return (f"step {progress['step']}/{progress['max_steps']} loss {progress['loss']:.4f} "
            f"lr {progress['learning_rate']:.2e} {progress['tokens_per_second']:.0f} tokens/s "
            f"eta {progress['eta_seconds']:.0f}s")


def progress_callback(progress: ProgressFn, tokens_per_step: float):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Reports step, loss, learning rate and throughput each time the trainer logs, and each held-out loss."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs:
                progress({"step": state.global_step, "max_steps": state.max_steps, "eval_loss": float(logs["eval_loss"])})
            if not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.started
            done = max(state.global_step, 1)
            progress(
                {
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "loss": float(logs["loss"]),
                    "learning_rate": float(logs.get("learning_rate", 0.0)),
                    "tokens_per_second": tokens_per_step * done / elapsed if elapsed > 0 else 0.0,
                    "elapsed_seconds": elapsed,
                    "eta_seconds": elapsed / done * (state.max_steps - state.global_step),
                }
            )

    return ProgressCallback()


def log_callback(on_log: LogFn):
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        """Hands every Trainer log (loss, learning rate, grad norm, the end-of-training summary) to on_log, at its step:
        what transformers' MLflowCallback would log, into a run the pipeline owns rather than one set up from
        environment variables and the process's active run."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                on_log(state.global_step, dict(logs))

    return LogCallback()


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a Trainer checkpoint was written at."""
    import json

    return int(json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"])


def checkpoint_callback(on_checkpoint: CheckpointFn | None):
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        """Hands each checkpoint the Trainer has just written (complete on disk) to on_checkpoint."""

        def on_step_end(self, args, state, control, **kwargs):
            # The Trainer also checkpoints the last step, which nothing resumes from: the adapter is saved anyway.
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and on_checkpoint is not None:
                on_checkpoint(folder, state.global_step)

    return CheckpointCallback()
