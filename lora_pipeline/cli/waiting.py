"""Says when a CLI run's step waits for a slot of the `gpu` pool, and which run holds it: Dagster queues the
step without a word, so a promote behind a running sweep looked hung for minutes."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator

from lora_pipeline.assets.common import GPU_POOL
from lora_pipeline.reclaim import HOST_TAG, PID_TAG


# Seconds each run of this process spent with a step waiting for a pool slot (as often as the watch looks).
_WAITED: dict[str, float] = {}


def pool_wait_seconds(run_id: str | None) -> float:
    """How long run_id's steps waited for a gpu pool slot, as pool_wait_notices saw it (0 for a run it did not
    watch): run and sweep times are given without it."""
    return _WAITED.get(run_id, 0.0) if run_id else 0.0


@contextlib.contextmanager
def pool_wait_notices(instance, run_id: str, stream=sys.stderr, every: float = 1.0) -> Iterator[None]:
    """While the block runs, a line on stream whenever one of run_id's steps starts waiting for a pool slot or the
    slots change hands while it waits; the time waited is counted (pool_wait_seconds)."""
    stop = threading.Event()
    _WAITED[run_id] = 0.0

    def watch() -> None:
        said = None
        looked = time.monotonic()
        while not stop.wait(every):
            now, since = time.monotonic(), looked
            looked = now
            try:
                info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
            except Exception:  # an instance without pools, or one closing: nothing to say
                return
            waiting = sorted(step.step_key for step in info.pending_steps
                             if step.run_id == run_id and step.assigned_timestamp is None)
            holders = tuple(sorted((slot.run_id, slot.step_key) for slot in info.claimed_slots if slot.run_id != run_id))
            if not waiting:
                said = None
                continue
            _WAITED[run_id] += now - since
            if (tuple(waiting), holders) != said:
                said = (tuple(waiting), holders)
                print(waiting_line(instance, waiting, holders, info.slot_count), file=stream, flush=True)

    thread = threading.Thread(target=watch, name="pool-wait-notices", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 5)


def waiting_line(instance, waiting: list[str], holders: tuple, slots: int) -> str:
    """'trained_adapter waits for the gpu pool (1 slot): held by run 1a2b3c4d (model beta, step merged_model, pid
    4242 on host1)'."""
    held = []
    for holder_run, step in holders:
        run = instance.get_run_by_id(holder_run)
        tags = run.tags if run is not None else {}
        where = f", pid {tags[PID_TAG]} on {tags.get(HOST_TAG, '?')}" if PID_TAG in tags else ""
        held.append(f"run {holder_run[:8]} (model {tags.get('dagster/partition', '?')}, step {step}{where})")
    return (f"{', '.join(waiting)} waits for the {GPU_POOL} pool ({slots} slot{'s' if slots != 1 else ''}): "
            + (f"held by {'; '.join(held)}" if held else "no slot free yet") + "; it starts when one is")
