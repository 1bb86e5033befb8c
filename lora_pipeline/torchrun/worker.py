"""One rank of a distributed training: what `torchrun ... -m lora_pipeline.torchrun.worker SPEC` runs.

trained_adapter starts torchrun through Dagster Pipes (torchrun/launch.py) with a spec file: the
same arguments the in-process path gives train_adapter. Every rank trains; rank 0 alone opens
Pipes (when every rank does, Dagster fails the step with "multiple materialize results"), so the
run log hears rank 0's progress and the Trainer's logs, and rank 0 alone saves the adapter.

Beside the spec, in its folder, the ranks and the Dagster step talk through files:
  checkpoint-STEP.json / .done / .failed  rank 0 hands a checkpoint over and waits until the step has
                                          published it to the store (a killed run resumes from it)
  rank-N.error                            what made rank N fail, for the step's error
  result.json                             rank 0's TrainResult
Rank 0 also watches the step's process: if it is gone (SIGKILLed), the training stops rather than
running on as orphans; torchrun then stops the other ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
# How long rank 0 waits for the step to publish a checkpoint before giving up.
CHECKPOINT_TIMEOUT_SECONDS = 3600


def error_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank}.error"


def checkpoint_files(folder: Path, step: int) -> tuple[Path, Path, Path]:
    """The request rank 0 writes for a checkpoint, and the step's two possible answers."""
    stem = folder / f"checkpoint-{step}"
    return stem.with_suffix(".json"), stem.with_suffix(".done"), stem.with_suffix(".failed")


def training_spec(base_dir: Path, train_file: Path, out_dir: Path, lora, training, device, options, *,
                  base_model_name: str, resume_from: Path | None = None, trust_remote_code: bool = False,
                  report_to: tuple[str, ...] = (), held_out_file: Path | None = None, eval_settings=None) -> dict:
    """train_adapter's arguments as the JSON data every rank reads back (_train): the splits as their files."""
    held_out = {"held_out_file": str(held_out_file), "eval_max_examples": eval_settings.max_examples,
                "eval_batch_size": eval_settings.batch_size} if training.eval_steps and held_out_file else {}
    return {**held_out, "base_dir": str(base_dir), "train_file": str(train_file), "out_dir": str(out_dir),
            "lora": lora.model_dump(), "training": training.model_dump(), "device": asdict(device),
            "options": asdict(options), "base_model_name": base_model_name,
            "resume_from": str(resume_from) if resume_from is not None else None,
            "trust_remote_code": trust_remote_code, "report_to": list(report_to)}


def write_spec(folder: Path, spec: dict, launch, live_logs: bool) -> Path:
    """The spec file in folder: the training's arguments (training_spec), the launch, this process's pid (rank 0
    stops when it is gone) and whether rank 0 sends the Trainer's logs back."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / SPEC_FILE
    spec_file.write_text(json.dumps({**spec, "launch": asdict(launch), "parent_pid": os.getpid(),
                                     "live_logs": live_logs}))
    return spec_file


class StepGone(RuntimeError):
    """The Dagster step that launched the training has exited."""


def _check_step_alive(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise StepGone(f"the Dagster step (pid {pid}) that launched this training is gone; stopping") from None


def _hand_over_checkpoint(folder: Path, parent_pid: int, checkpoint: Path, step: int) -> None:
    request, done, failed = checkpoint_files(folder, step)
    partial = request.with_suffix(".partial")
    partial.write_text(json.dumps({"folder": str(checkpoint), "step": step}))
    partial.rename(request)  # the step never reads a half-written request
    deadline = time.monotonic() + CHECKPOINT_TIMEOUT_SECONDS
    while not done.exists():
        if failed.exists():
            raise RuntimeError(f"publishing the checkpoint at step {step} failed: {failed.read_text()}")
        _check_step_alive(parent_pid)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the checkpoint at step {step} was not published within {CHECKPOINT_TIMEOUT_SECONDS}s")
        time.sleep(0.1)


def _train(spec: dict, folder: Path, pipes=None):
    """This rank's part: train_adapter with the spec's arguments; rank 0's reports go through Pipes."""
    import pandas as pd

    from lora_pipeline.config.schema import LoraSettings, TrainingSettings
    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.evaluation.suite import held_out_examples
    from lora_pipeline.ml.training import StepOptions, train_adapter
    from lora_pipeline.ml.training.distributed import Launch
    from lora_pipeline.ml.training.telemetry import progress_line

    parent_pid = spec["parent_pid"]

    def progress(report: dict) -> None:
        _check_step_alive(parent_pid)
        pipes.log.info(progress_line(report))

    def on_log(step: int, logs: dict) -> None:
        # The step replays these into its MLflow run when the training ends.
        pipes.report_custom_message({"step": step, "logs": logs})

    def on_checkpoint(checkpoint: Path, step: int) -> None:
        _hand_over_checkpoint(folder, parent_pid, checkpoint, step)

    return train_adapter(
        Path(spec["base_dir"]), pd.read_parquet(spec["train_file"]), Path(spec["out_dir"]),
        LoraSettings(**spec["lora"]), TrainingSettings(**spec["training"]), DeviceInfo(**spec["device"]),
        spec["base_model_name"],
        progress=progress if pipes else None,
        on_checkpoint=on_checkpoint if pipes else None,
        resume_from=Path(spec["resume_from"]) if spec["resume_from"] else None,
        trust_remote_code=spec["trust_remote_code"],
        options=StepOptions(**spec["options"]),
        report_to=tuple(spec["report_to"]),
        on_log=on_log if pipes and spec["live_logs"] else None,
        launch=Launch(**spec["launch"]),
        held_out=held_out_examples(spec["held_out_file"], spec["eval_max_examples"]) if "held_out_file" in spec
        else None,
        eval_batch_size=spec.get("eval_batch_size", 8),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun ... -m lora_pipeline.torchrun.worker SPEC_JSON", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    folder = spec_path.parent
    spec = json.loads(spec_path.read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        if rank == 0:
            from dagster_pipes import open_dagster_pipes

            with open_dagster_pipes() as pipes:
                pipes.log.info(f"rank 0 of {os.environ.get('WORLD_SIZE', '1')}: training "
                               f"({spec['launch']['strategy']})")
                result = _train(spec, folder, pipes)
                (folder / RESULT_FILE).write_text(json.dumps(asdict(result)))
        else:
            _train(spec, folder)
    except BaseException as error:  # noqa: BLE001 - every failure is reported, then raised again
        error_file(folder, rank).write_text(
            f"{type(error).__name__}: {error}\n\n{''.join(traceback.format_exception(error)[-12:])}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
