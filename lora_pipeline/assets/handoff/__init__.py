"""The on-demand hand-off stages: what users take a model away with (the Hub, GGUF files), run only when asked."""

import dagster as dg

from lora_pipeline.assets.common import ARTIFACT_IO, MODEL_PARTITIONS

# The run tag by which the CLI says which on-demand stages it was asked for (`--select gguf_export`), so they run
# even when the same run also brings their parents up to date.
REQUESTED_TAG = "lora_pipeline/requested"
# Each on-demand stage and the job of definitions.py that runs it alone.
HANDOFF_JOBS = {"published_model": "publish", "gguf_export": "export"}
HANDOFF_STAGES = tuple(HANDOFF_JOBS)


def handoff_asset(*, kinds: set[str], code_version: str = "1"):
    """The declaration of an on-demand stage: one partition per model, ArtifactRef pointers, in the decision
    group. Listed in its module's ON_DEMAND_ASSETS, it is in the graph but in no job that runs on its own
    (assets/__init__.py; definitions.py gives each its own job). Its output is optional: in a run that did not ask
    for it (not_requested) it materializes nothing."""
    return dg.asset(partitions_def=MODEL_PARTITIONS, io_manager_key=ARTIFACT_IO, kinds=kinds, group_name="decision",
                    code_version=code_version, output_required=False)


def not_requested(context: dg.AssetExecutionContext) -> str | None:
    """Why this on-demand stage does nothing in this run, or None when the run asked for it: its own job, a
    selection of on-demand stages only (the asset materialized on its own in the UI), or the CLI's request tag.

    The UI's "Materialize all" selects every asset in view, these too: uploading to the Hub or converting to GGUF
    as a side effect of re-running the pipeline is not what anyone asked for, so such a run skips them and says so.
    """
    name = context.asset_key.path[-1]
    run = context.run
    if name in run.tags.get(REQUESTED_TAG, "").split(","):
        return None
    # What this run materializes: the UI's selection, else the job's own assets (a job, or dg.materialize's).
    selection = run.asset_selection or set(context.job_def.asset_layer.executable_asset_keys)
    if selection and all(key.path[-1] in HANDOFF_STAGES for key in selection):
        return None
    return (f"{name} runs on demand only, and this run also materializes other stages (as 'Materialize all' "
            f"does): not run. Run the '{HANDOFF_JOBS[name]}' job, materialize {name} on its own, or `lora-pipeline run CONFIG "
            f"--select {name}`")
