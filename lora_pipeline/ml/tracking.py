"""MLflow as the pipeline's tracker: one run per adapter, its curves and metrics, the adapter as a model, aliases.

Dagster-free. mlflow (and torch, for logging the adapter) are imported only when a config reports
to MLflow, with MLflow's telemetry off. Runs are found again by the adapter they recorded (the
`lora_pipeline.adapter` tag holds the adapter artifact's sha256), so evaluation and promotion add
to the run that trained the adapter without anything about tracking being stored with the artifacts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

DB_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlflow-artifacts"  # beside a SQLite database: MLflow 3 would otherwise write to ./mlruns
ADAPTER_TAG = "lora_pipeline.adapter"
LOGGED_MODEL_TAG = "lora_pipeline.logged_model"
MODEL_NAME = "adapter"  # the logged model's name in its run
CHALLENGER, CHAMPION = "challenger", "champion"
# What loading the logged adapter needs; given explicitly, as MLflow's own guess asks for torchvision.
MODEL_REQUIREMENTS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the SQLite file mlflow.db in the Dagster instance folder ($DAGSTER_HOME, .dagster)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(os.environ.get('DAGSTER_HOME') or '.dagster').resolve() / DB_FILE}"


def import_mlflow(uri: str):
    """mlflow with its telemetry off, its fluent API pointed at uri (mlflow.transformers.log_model reads that one)."""
    # Before the import: mlflow starts its telemetry client as it is imported. An explicit setting is respected.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.telemetry import set_telemetry_client

    set_telemetry_client()  # reads the variable again, in case mlflow was imported before it was set
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (a relative one from the working directory, as MLflow reads it), else None."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


@dataclass(frozen=True)
class RunRef:
    """An MLflow run: where it is, and how to show it."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def url(self) -> str | None:
        """The run's page when the tracking URI is a server (a database has no web page of its own)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def metadata(self) -> dict:
        """The asset metadata that links a materialization to its run."""
        return {"mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id,
                **({"mlflow_run_url": self.url} if self.url else {"mlflow_tracking_uri": self.tracking_uri})}


def numeric_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a dict (the Trainer's logs, the report's metrics), names prefixed; the rest left out."""
    found = {}
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[prefix + name] = float(value)
    return found


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys (lora.r), values as text."""
    found = {}
    for name, value in values.items():
        if isinstance(value, dict):
            found.update(flat_params(value, f"{prefix}{name}."))
        else:
            found[prefix + name] = str(value)[:6000]  # MLflow's param value limit
    return found


class MlflowTracker:
    """One tracking URI and experiment: start and find runs, log to them, log and register the adapter."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        database = sqlite_path(uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        self.mlflow = import_mlflow(uri)
        self.client = self.mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = self._experiment(experiment, database)

    def _experiment(self, name: str, database: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (database.parent / ARTIFACTS_FOLDER / name).as_uri() if database is not None else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another run of the same model
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def ref(self, run_id: str) -> RunRef:
        return RunRef(self.uri, self.experiment_id, run_id)

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, str]) -> RunRef:
        """A new run, tagged, with its params."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        entries = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(entries), 100):  # MLflow's limit of params per batch
            self.client.log_batch(run.info.run_id, params=entries[start:start + 100])
        return self.ref(run.info.run_id)

    def find(self, adapter_sha256: str) -> RunRef | None:
        """The newest finished run that recorded this adapter, or None (a run that failed after training, e.g. while
        logging the model, is not it: the adapter gets a complete run of its own)."""
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`{ADAPTER_TAG}` = '{adapter_sha256}' and attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return self.ref(runs[0].info.run_id) if runs else None

    def log_metrics(self, run: RunRef, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        metrics = [Metric(name, value, now, step) for name, value in values.items()]
        if metrics:
            self.client.log_batch(run.run_id, metrics=metrics)

    def log_history(self, run: RunRef, history: list[tuple[int, float]], name: str = "train/loss") -> None:
        """A curve logged after the fact (an adapter trained before tracking was on): one point per step."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        points = [Metric(name, float(value), now, int(step)) for step, value in history]
        for start in range(0, len(points), 1000):  # MLflow's batch limit
            self.client.log_batch(run.run_id, metrics=points[start:start + 1000])

    def set_tags(self, run: RunRef, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, run: RunRef, status: str = "FINISHED") -> None:
        self.client.set_terminated(run.run_id, status=status)

    def log_adapter(self, run: RunRef, adapter_dir: Path, base_dir: Path, trust_remote_code: bool = False) -> str:
        """Log the adapter as a transformers model whose base is base_dir by path (no base weights copied, no hub
        needed to load it); return the logged model's id, also kept as the run's tag."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # On the CPU: logging saves the adapter's weights and the tokenizer; nothing runs.
        base = AutoModelForCausalLM.from_pretrained(base_dir, device_map={"": "cpu"},
                                                    trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
        with self.mlflow.start_run(run_id=run.run_id):  # log_model logs into the active run, in its experiment
            info = self.mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer}, name=MODEL_NAME, task="text-generation",
                base_model_path=str(Path(base_dir).resolve()), pip_requirements=model_requirements(),
            )
        self.set_tags(run, {LOGGED_MODEL_TAG: info.model_id})
        return info.model_id

    def logged_model(self, run: RunRef) -> str | None:
        return self.client.get_run(run.run_id).data.tags.get(LOGGED_MODEL_TAG)

    def register(self, run: RunRef, name: str) -> str:
        """The registered version of the run's logged model under name (registered now if it was not); its number."""
        escaped = name.replace("'", "\\'")
        existing = self.client.search_model_versions(f"name = '{escaped}' and run_id = '{run.run_id}'")
        if existing:
            return str(max(int(version.version) for version in existing))
        model_id = self.logged_model(run)
        if model_id is None:
            raise ValueError(f"MLflow run {run.run_id} has no logged model to register (tracking.log_model was off)")
        version = self.mlflow.register_model(f"models:/{model_id}", name, tags={ADAPTER_TAG: self._adapter_of(run)})
        return str(version.version)

    def _adapter_of(self, run: RunRef) -> str:
        return self.client.get_run(run.run_id).data.tags.get(ADAPTER_TAG, "")

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point alias at version (an alias names one version at a time: it moves)."""
        self.client.set_registered_model_alias(name, alias, version)


def model_requirements() -> list[str]:
    """The installed versions of what loading the logged adapter needs (local builds' +cpu suffixes dropped)."""
    found = []
    for name in MODEL_REQUIREMENTS:
        try:
            found.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return found
