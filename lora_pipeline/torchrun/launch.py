"""trained_adapter on several processes: torchrun started through Dagster Pipes.

The step writes a spec (the arguments the in-process path gives train_adapter), starts
`torchrun ... -m lora_pipeline.torchrun.worker SPEC` with Dagster's PipesSubprocessClient (rank 0's
logs reach the run log as they happen; cancelling the run sends torchrun SIGINT, which stops every
rank), publishes each checkpoint rank 0 hands over while the ranks wait, and reads rank 0's result.
The asset then publishes the adapter exactly as after an in-process training.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not re-exported at the top level in 1.13

from lora_pipeline.ml.training import TrainResult
from lora_pipeline.ml.training.distributed import Launch, threads_per_rank, torchrun_command
from lora_pipeline.torchrun.worker import RESULT_FILE, checkpoint_files, error_file, write_spec

WORKER_MODULE = "lora_pipeline.torchrun.worker"


class DistributedTrainingError(RuntimeError):
    """A rank of a distributed training failed; the message is that rank's error."""


def train_with_torchrun(context: dg.AssetExecutionContext, launch: Launch, spec: dict, work: Path,
                        publish_checkpoint: Callable[[Path, int], None],
                        on_log: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run the training spec (worker.training_spec) on launch's ranks; rank 0's TrainResult. work: an empty folder
    for the talk."""
    spec_file = write_spec(work, spec, launch, live_logs=on_log is not None)
    command = torchrun_command(launch, WORKER_MODULE, [str(spec_file)])
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(threads_per_rank(launch))}
    context.log.info(f"training on {launch.world_size} processes ({launch.strategy}): {' '.join(command[1:])}")
    stop = threading.Event()
    watcher = threading.Thread(target=_publish_handed_over_checkpoints, args=(work, publish_checkpoint, stop),
                               name="checkpoint-handover", daemon=True)
    watcher.start()
    try:
        invocation = dg.PipesSubprocessClient(env=env).run(context=context, command=command)
    except DagsterPipesExecutionError as failed:
        raise DistributedTrainingError(_rank_failure(work, launch) or str(failed)) from None
    finally:
        stop.set()
        watcher.join()
    if on_log is not None:
        for message in invocation.get_custom_messages():
            on_log(int(message["step"]), dict(message["logs"]))
    return TrainResult(**json.loads((work / RESULT_FILE).read_text()))


def _publish_handed_over_checkpoints(work: Path, publish: Callable[[Path, int], None], stop: threading.Event) -> None:
    """Publish each checkpoint rank 0 hands over, answering .done (or .failed with the reason)."""
    while not stop.wait(0.2):
        for request in sorted(work.glob("checkpoint-*.json")):
            handed = json.loads(request.read_text())
            _, done, failed = checkpoint_files(work, handed["step"])
            if done.exists() or failed.exists():
                continue
            try:
                publish(Path(handed["folder"]), handed["step"])
            except Exception as error:  # noqa: BLE001 - rank 0 raises it and the step fails with it
                failed.write_text(f"{type(error).__name__}: {error}")
            else:
                done.write_text("")


def _rank_failure(work: Path, launch: Launch) -> str | None:
    """The first rank's error, in the order they failed (the others mostly fail because it did)."""
    errors = sorted((path for rank in range(launch.world_size) if (path := error_file(work, rank)).exists()),
                    key=lambda path: path.stat().st_mtime)
    if not errors:
        return None
    first = errors[0]
    rank = first.stem.removeprefix("rank-")
    return f"rank {rank} of {launch.world_size} failed: {first.read_text().strip()}"
