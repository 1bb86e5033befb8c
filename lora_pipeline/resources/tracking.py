"""The experiment tracker: where trainings, evaluations and promotions are recorded beside the store.

Every method takes the model's `tracking` config section and does nothing unless that section
asks for this tracker (`report_to: [mlflow]`), so the default contacts nothing. Each returns the
asset metadata that links a materialization to what was recorded. Tracking never changes an
artifact: a run is found again by the adapter it recorded.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import dagster as dg
from pydantic import Field

from lora_pipeline.resources.artifacts import LINEAGE

if TYPE_CHECKING:
    from lora_pipeline.config.schema import TrackingSettings
    from lora_pipeline.ml.tracking import MlflowTracker, RunRef
    from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

TRAINING_SUMMARY = "training_summary.json"  # trained_adapter writes it into the adapter: steps, losses, loss history
PARAM_SECTIONS = ("base_model", "quantization", "lora", "training")  # what made the adapter, as MLflow params


def linked(metadata: dict) -> dict:
    """Asset metadata with the run's page as a link."""
    return {name: dg.MetadataValue.url(value) if name.endswith("_url") else value for name, value in metadata.items()}


def lineage_tags(record: dict) -> dict[str, str]:
    """The run's tags from a stage's lineage record: the Dagster run, the partition and the data versions."""
    tags = {"dagster.run_id": record.get("dagster_run_id", ""), "dagster.partition": record.get("model", ""),
            "lora_pipeline.source_version": record.get("source_version", ""),
            "lora_pipeline.inputs_key": record.get("inputs_key", "")}
    for parent, entry in record.get("parents", {}).items():
        tags[f"lora_pipeline.{parent}"] = str(entry.get("version") or entry.get("sha256", ""))
    return {name: str(value) for name, value in tags.items() if value}


def lineage_params(record: dict) -> dict[str, str]:
    """What made the adapter, from its lineage's config: the base, its quantization, the LoRA and training settings."""
    from lora_pipeline.ml.tracking import flat_params

    config = record.get("config", {})
    return flat_params({name: config[name] for name in PARAM_SECTIONS if name in config})


class LiveTraining:
    """A training being recorded: the Trainer's logs go to `log` as it trains, `finish` or `fail` ends the run."""

    def __init__(self, tracker: "MlflowTracker", run: "RunRef", settings: "TrackingSettings", owner: str) -> None:
        self.tracker, self.run, self.settings, self.owner = tracker, run, settings, owner

    def log(self, step: int, logs: dict) -> None:
        """One Trainer log (loss, learning rate, grad norm, ...) at its optimizer step."""
        from lora_pipeline.ml.tracking import numeric_metrics

        self.tracker.log_metrics(self.run, numeric_metrics(logs, "train/"), step)

    def finish(self, adapter: "ArtifactRef", adapter_dir: Path, base_dir: Path, summary: dict,
               trust_remote_code: bool = False) -> dict:
        """The adapter's facts into the run, the adapter logged as a model; the asset's metadata."""
        from lora_pipeline.ml.tracking import ADAPTER_TAG, numeric_metrics

        self.tracker.set_tags(self.run, {ADAPTER_TAG: adapter.sha256, "lora_pipeline.adapter_uri": adapter.uri})
        self.tracker.log_metrics(self.run, numeric_metrics(summary, "summary/"), int(summary.get("steps", 0)))
        if self.settings.log_model:
            self.tracker.log_adapter(self.run, adapter_dir, base_dir, trust_remote_code)
        self.tracker.end(self.run)
        return linked(self.run.metadata())

    def fail(self) -> None:
        self.tracker.end(self.run, "FAILED")


class ExperimentTracker(dg.ConfigurableResource):
    """Records trainings, evaluations and promotions in MLflow when a model's config says `tracking.report_to:
    [mlflow]`: one run per adapter with the Trainer's curves, the evaluation's metrics, the adapter as a model
    loadable without the hub, and registry aliases that follow promotion (challenger, champion)."""

    tracking_uri: Optional[str] = Field(
        default=None,
        description="MLflow tracking URI for configs that set none (tracking.tracking_uri). Unset: "
        "$MLFLOW_TRACKING_URI, else sqlite:///$DAGSTER_HOME/mlflow.db.",
    )

    def _tracker(self, settings: "TrackingSettings", owner: str) -> "MlflowTracker":
        from lora_pipeline.ml.tracking import MlflowTracker, default_tracking_uri

        uri = settings.tracking_uri or self.tracking_uri or default_tracking_uri()
        return MlflowTracker(uri, settings.experiment or owner)

    def start_training(self, settings: "TrackingSettings", owner: str, run_name: str,
                       record: dict) -> LiveTraining | None:
        """A run for a training about to start (None when the config does not report to MLflow); record is the
        stage's lineage so far (Dagster run, partition, parents' versions, config)."""
        if not settings.mlflow:
            return None
        tracker = self._tracker(settings, owner)
        return LiveTraining(tracker, tracker.start(run_name, lineage_tags(record), lineage_params(record)),
                            settings, owner)

    @contextlib.contextmanager
    def training(self, settings: "TrackingSettings", owner: str, run_name: str,
                 record: dict) -> Iterator[LiveTraining | None]:
        """start_training for the length of a block; the run is marked FAILED if the block raises."""
        live = self.start_training(settings, owner, run_name, record)
        try:
            yield live
        except BaseException:
            if live is not None:
                live.fail()
            raise

    def adapter_run(self, settings: "TrackingSettings", owner: str, storage: "ArtifactStore", adapter: "ArtifactRef",
                    base: "ArtifactRef", trust_remote_code: bool = False) -> dict:
        """The metadata of the adapter's run, recorded now from the adapter's folder when there is none yet (an
        adapter reused, or trained before tracking was on): its lineage, its loss curve and the model."""
        if not settings.mlflow:
            return {}
        return linked(self._run_of(settings, owner, storage, adapter, base, trust_remote_code)[1].metadata())

    def _run_of(self, settings, owner, storage, adapter, base, trust_remote_code: bool):
        tracker = self._tracker(settings, owner)
        run = tracker.find(adapter.sha256)
        if run is not None:
            return tracker, run
        adapter_dir = storage.local_path(adapter)
        record = json.loads((adapter_dir / LINEAGE).read_text(encoding="utf-8"))
        summary = json.loads((adapter_dir / TRAINING_SUMMARY).read_text(encoding="utf-8"))
        live = LiveTraining(tracker, tracker.start(record.get("model", owner), lineage_tags(record),
                                                    lineage_params(record)), settings, owner)
        tracker.log_history(live.run, logged_curve(summary))
        if summary.get("eval_history"):  # the evaluations while training, on the same steps
            tracker.log_history(live.run, [tuple(point) for point in summary["eval_history"]], name="train/eval_loss")
        live.finish(adapter, adapter_dir, storage.local_path(base), summary, trust_remote_code)
        return tracker, live.run

    def evaluated(self, settings: "TrackingSettings", owner: str, storage: "ArtifactStore", adapter: "ArtifactRef",
                  base: "ArtifactRef", metrics: dict, trust_remote_code: bool = False) -> dict:
        """The evaluation's metrics into the adapter's run; the adapter registered with the alias 'challenger'."""
        if not settings.mlflow:
            return {}
        from lora_pipeline.ml.tracking import CHALLENGER, numeric_metrics

        tracker, run = self._run_of(settings, owner, storage, adapter, base, trust_remote_code)
        tracker.log_metrics(run, numeric_metrics(metrics, "eval/"))
        return linked({**run.metadata(), **self._alias(tracker, run, settings, owner, CHALLENGER)})

    def promoted(self, settings: "TrackingSettings", owner: str, storage: "ArtifactStore", adapter: "ArtifactRef",
                 base: "ArtifactRef", trust_remote_code: bool = False) -> dict:
        """The alias 'champion' moved to the promoted adapter's registered version."""
        if not settings.mlflow:
            return {}
        from lora_pipeline.ml.tracking import CHAMPION

        tracker, run = self._run_of(settings, owner, storage, adapter, base, trust_remote_code)
        tracker.set_tags(run, {"lora_pipeline.champion_of": owner})
        return linked({**run.metadata(), **self._alias(tracker, run, settings, owner, CHAMPION)})

    @staticmethod
    def _alias(tracker: "MlflowTracker", run: "RunRef", settings: "TrackingSettings", owner: str, alias: str) -> dict:
        if not settings.register_model:
            return {}
        name = settings.registered_model or owner
        version = tracker.register(run, name)
        tracker.set_alias(name, alias, version)
        return {"mlflow_registered_model": name, "mlflow_model_version": version,
                f"mlflow_{alias}": f"models:/{name}@{alias}"}


def logged_curve(summary: dict) -> list[tuple[int, float]]:
    """The training summary's loss as (step, loss): SFT stores pairs; a preference run the losses and, beside them,
    the step each was logged at."""
    history = summary.get("loss_history") or []
    if history and not isinstance(history[0], (list, tuple)):
        steps = summary.get("logged_steps") or range(1, len(history) + 1)
        return list(zip(steps, history))
    return [tuple(point) for point in history]


class NoTracking(ExperimentTracker):
    """A tracker that records nothing and contacts nothing, whatever the config says (tests, air-gapped runs)."""

    def start_training(self, settings, owner, run_name, record) -> None:
        return None

    def adapter_run(self, settings, owner, storage, adapter, base, trust_remote_code=False) -> dict:
        return {}

    def evaluated(self, settings, owner, storage, adapter, base, metrics, trust_remote_code=False) -> dict:
        return {}

    def promoted(self, settings, owner, storage, adapter, base, trust_remote_code=False) -> dict:
        return {}
