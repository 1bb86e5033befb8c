"""Runs whose process is gone: marked failed, their `gpu` pool slots freed, however they were launched.

A process killed with SIGKILL cannot report its end, so its run stays STARTED and keeps its pool
slot: every later run waits behind it. The CLI's in-process runs carry their pid and host as tags;
a run the UI, `dg launch` through the daemon, a schedule or a sensor started is executed by a run
worker that logs its pid ("Started process for run (pid: N)"). Both are checked on this machine by
the CLI before each run and by the `dead_runs` sensor every 30 s. Runs in pods are Dagster's run
monitoring's to reclaim (deploy/dagster.yaml turns it on).
"""

from __future__ import annotations

import socket

import dagster as dg

PID_TAG = "lora_pipeline/pid"
HOST_TAG = "lora_pipeline/host"


def run_process(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[int, str] | None:
    """(pid, host) of the process executing the run, when that is known; None otherwise."""
    if run.tags.get(PID_TAG):
        return int(run.tags[PID_TAG]), run.tags.get(HOST_TAG, "")
    if type(instance.run_launcher).__name__ != "DefaultRunLauncher":
        return None  # a pod or another machine: not ours to judge from here
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        message = record.dagster_event.message if record.dagster_event else record.user_message
        if (message or "").startswith("Started process for run (pid: "):
            return int(message.split("(pid: ", 1)[1].split(")", 1)[0]), socket.gethostname()
    return None


def reclaim_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark this machine's STARTED runs whose process is gone as failed and free their pool slots; one line each."""
    from lora_pipeline.resources.locks import process_alive

    host = socket.gethostname()
    reclaimed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        process = run_process(instance, run)
        if process is None or process[1] != host or process_alive(process[0]):
            continue
        instance.report_run_failed(run, message=f"the process running it (pid {process[0]}) is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reclaimed.append(f"run {run.run_id} was killed (pid {process[0]} is gone); marked failed, its pool slot freed")
    return reclaimed


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def dead_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Frees the `gpu` pool slots of runs whose process was killed (UI, dg launch, schedules, sensors, the CLI),
    and marks those runs failed, so the runs queued behind them start."""
    reclaimed = reclaim_dead_runs(context.instance)
    for line in reclaimed:
        context.log.warning(line)
    return dg.SkipReason("; ".join(reclaimed) or "no run of this machine lost its process")
