"""The deployment files, validated offline (no cluster, no Helm binary here).

- deploy/dagster.yaml loads through Dagster's own instance schema and its run launcher and run
  coordinator rehydrate from it, as the daemon does.
- The run-worker and step Jobs that dagster-k8s builds from those files and from our stages'
  `dagster-k8s/config` tags pass the Kubernetes API schema of KUBERNETES_VERSION (kubernetes-validate,
  strict: unknown fields fail); only the GPU stages' pods ask for a GPU.
- deploy/helm/values.yaml uses only fields of the Dagster chart and agrees with the image that
  deploy/Dockerfile builds and with deploy/dagster.yaml.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from unittest import mock

import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import RunLauncher
from dagster._core.run_coordinator import QueuedRunCoordinator, RunCoordinator
from dagster._core.storage.dagster_run import DagsterRun
from dagster_k8s import launcher as k8s_launcher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import construct_dagster_k8s_job, get_k8s_job_name, get_user_defined_k8s_config

from conftest import REPO
from lora_pipeline import deploy

DEPLOY = REPO / "deploy"
# The newest Kubernetes API schema kubernetes-validate 1.37.0 ships; dagster-k8s 0.29.27 pins the
# kubernetes client below 37, whose models produce bodies this API accepts.
KUBERNETES_VERSION = "1.37.0"
GPU_STAGES = {"quantized_base", "trained_adapter", "merged_model", "eval_report", "champion"}
PG_ENV = {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "secret",
          "DAGSTER_PG_DB": "dagster", "LORA_PIPELINE_IMAGE": "registry.example.com/ml/lora-pipeline:0.1.0"}


@pytest.fixture
def instance_ref(tmp_path, monkeypatch) -> InstanceRef:
    """deploy/dagster.yaml read by Dagster's instance loader, with the variables it names set."""
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    return InstanceRef.from_dir(str(tmp_path))


def rehydrate_launcher(data) -> k8s_launcher.K8sRunLauncher:
    """The run launcher as the daemon builds it, minus reading a cluster's credentials."""
    with mock.patch.object(k8s_launcher, "load_kubernetes_config"):
        return data.rehydrate(RunLauncher)


def make_launcher(**config) -> k8s_launcher.K8sRunLauncher:
    """A K8sRunLauncher from keyword config, without a cluster."""
    with mock.patch.object(k8s_launcher, "load_kubernetes_config"):
        return k8s_launcher.K8sRunLauncher(**config)


def k8s_body(model) -> dict:
    """A kubernetes client model as the API receives it (camelCase, no nulls)."""
    return kubernetes.client.ApiClient().sanitize_for_serialization(model)


def validate(body: dict) -> None:
    """Kubernetes' own schema for the body's kind, strict (an unknown or misspelt field fails)."""
    kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)


def pod_of(job: dict) -> dict:
    """The Pod that the Job's template makes."""
    template = job["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}


def gpus(pod_spec: dict) -> int:
    """GPUs the pod's containers ask for."""
    return sum(int(c.get("resources", {}).get("limits", {}).get(deploy.GPU_RESOURCE, 0)) for c in pod_spec["containers"])


def run_worker_job(launcher: k8s_launcher.K8sRunLauncher) -> dict:
    """The run worker's Job, built the way K8sRunLauncher.launch_run builds it."""
    run = DagsterRun(job_name="tune", run_id=str(uuid.uuid4()))
    context = launcher.get_container_context_for_run(run)
    job = construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(job_image=None, run_launcher=launcher),
        args=["dagster", "api", "execute_run", "{}"], job_name=f"dagster-run-{run.run_id}",
        component="run_worker", user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": run.job_name, "dagster/run-id": run.run_id},
    )
    return k8s_body(job)


def step_job(launcher: k8s_launcher.K8sRunLauncher, step_key: str, step_tags: dict[str, str]) -> dict:
    """A step's Job, built the way k8s_job_executor's step handler builds it: the run's container
    context, then the step's `dagster-k8s/config` tags merged over it."""
    run = DagsterRun(job_name="tune", run_id=str(uuid.uuid4()))
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags))
    )
    name = f"dagster-step-{get_k8s_job_name(run.run_id, step_key)}"
    job = construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(None, launcher), args=["dagster", "api", "execute_step", "{}"],
        job_name=name, pod_name=name, component="step_worker", user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": run.job_name, "dagster/op": step_key, "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_STEP_KEY", "value": step_key}],
    )
    return k8s_body(job)


def stage_tags() -> dict[str, dict[str, str]]:
    """Every pipeline stage's op tags, as Dagster holds them."""
    from lora_pipeline.assets import PIPELINE_ASSETS

    return {asset.key.path[-1]: dict(asset.op.tags) for asset in PIPELINE_ASSETS}


# -- deploy/dagster.yaml ---------------------------------------------------------------------------

def test_the_instance_loads_and_its_run_launcher_rehydrates_with_no_gpu(instance_ref):
    launcher = rehydrate_launcher(instance_ref.run_launcher_data)
    assert isinstance(launcher, k8s_launcher.K8sRunLauncher)
    assert launcher.instance_config_map and launcher.job_image == PG_ENV["LORA_PIPELINE_IMAGE"]
    assert "LORA_PIPELINE_EXECUTOR=k8s" in launcher.env_vars  # one pod per step
    assert deploy.GPU_RESOURCE not in json.dumps(launcher.run_k8s_config)
    assert isinstance(instance_ref.run_coordinator_data.rehydrate(RunCoordinator), QueuedRunCoordinator)
    assert instance_ref.storage_data.class_name == "DagsterPostgresStorage"  # connected to in test_postgres.py


def test_the_run_worker_job_validates_and_asks_for_no_gpu(instance_ref):
    job = run_worker_job(rehydrate_launcher(instance_ref.run_launcher_data))
    validate(job)
    pod = pod_of(job)
    validate(pod)
    assert gpus(pod["spec"]) == 0
    container = pod["spec"]["containers"][0]
    assert container["image"] == PG_ENV["LORA_PIPELINE_IMAGE"]
    assert {"name": "LORA_PIPELINE_EXECUTOR", "value": "k8s"} in container["env"]


# -- the stages' dagster-k8s/config tags -----------------------------------------------------------

def test_exactly_the_gpu_pool_stages_carry_gpu_pod_config():
    from lora_pipeline.assets import PIPELINE_ASSETS

    in_pool = {asset.key.path[-1] for asset in PIPELINE_ASSETS if asset.op.pool == "gpu"}
    tagged = {name for name, tags in stage_tags().items() if deploy.K8S_CONFIG_TAG in tags}
    assert tagged == in_pool == GPU_STAGES


@pytest.mark.parametrize("stage", sorted(stage_tags()))
def test_every_stage_pod_validates_and_only_gpu_stages_get_a_gpu_node_and_shm(instance_ref, stage):
    job = step_job(rehydrate_launcher(instance_ref.run_launcher_data), stage, stage_tags()[stage])
    validate(job)
    pod = pod_of(job)
    validate(pod)
    spec = pod["spec"]
    container = spec["containers"][0]
    if stage in GPU_STAGES:
        assert gpus(spec) == deploy.GPUS_PER_STEP == 1
        assert spec["nodeSelector"] == deploy.GPU_NODE_SELECTOR
        assert spec["tolerations"] == deploy.GPU_TOLERATIONS
        shm = {v["name"]: v for v in spec["volumes"]}[deploy.SHM_VOLUME]
        assert shm["emptyDir"] == {"medium": "Memory"}
        assert {"name": deploy.SHM_VOLUME, "mountPath": "/dev/shm"} in container["volumeMounts"]
        # The run launcher's CPU and memory settings still reach the GPU pod (deep merge).
        assert container["resources"]["requests"]["memory"] == "1Gi"
    else:
        assert gpus(spec) == 0 and "nodeSelector" not in spec and "tolerations" not in spec
        assert not container.get("volumeMounts")


def test_the_validation_is_strict_enough_to_catch_a_misspelt_field(instance_ref):
    pod = pod_of(step_job(rehydrate_launcher(instance_ref.run_launcher_data), "trained_adapter",
                          stage_tags()["trained_adapter"]))
    pod["spec"]["volumes"][-1]["emptyDirectory"] = pod["spec"]["volumes"][-1].pop("emptyDir")
    with pytest.raises(kubernetes_validate.ValidationError, match="emptyDirectory"):
        validate(pod)


def test_the_gpu_count_is_the_number_of_the_steps_processes():
    """The hook for multi-process steps: one GPU per process, in the limits Kubernetes schedules on."""
    config = deploy.gpu_step_k8s_config(processes=4)
    assert config["container_config"]["resources"]["limits"][deploy.GPU_RESOURCE] == 4
    tags = deploy.k8s_step_tags(uses_gpu=True, processes=4)
    assert get_user_defined_k8s_config(tags).container_config["resources"]["limits"][deploy.GPU_RESOURCE] == 4
    assert deploy.k8s_step_tags(uses_gpu=False) == {}
    with pytest.raises(ValueError, match="at least one GPU"):
        deploy.gpu_step_k8s_config(processes=0)


def test_trained_adapters_pod_asks_for_one_gpu_per_torchrun_process(monkeypatch):
    from lora_pipeline.assets import trained_adapter

    limits = json.loads(trained_adapter.op.tags[deploy.K8S_CONFIG_TAG])["container_config"]["resources"]["limits"]
    assert limits[deploy.GPU_RESOURCE] == 1  # unset: one GPU, training in the step's own process
    monkeypatch.setenv(deploy.TRAINING_GPUS_ENV, "4")
    assert deploy.training_gpus() == 4
    monkeypatch.setenv(deploy.TRAINING_GPUS_ENV, "four")
    with pytest.raises(ValueError, match="LORA_PIPELINE_TRAINING_GPUS"):
        deploy.training_gpus()


def test_the_k8s_step_executor_is_opt_in(monkeypatch):
    from dagster_k8s import k8s_job_executor

    from lora_pipeline.definitions import build_definitions

    monkeypatch.delenv(deploy.EXECUTOR_ENV, raising=False)
    assert deploy.step_executor() is None  # the CLI and the demo: steps in the run worker
    monkeypatch.setenv(deploy.EXECUTOR_ENV, "k8s")
    assert deploy.step_executor() is k8s_job_executor
    assert build_definitions(automation=False).get_job_def("tune").executor_def.name == "k8s"
    monkeypatch.setenv(deploy.EXECUTOR_ENV, "kubernetes")
    with pytest.raises(ValueError, match="in_process, multiprocess, k8s"):
        deploy.step_executor()


# -- deploy/helm/values.yaml -----------------------------------------------------------------------

# The fields of the Dagster Helm chart 1.13 (helm/dagster/values.schema.json and the pydantic models
# it is generated from, helm/dagster/schema/schema/charts/) in the sections our values use, written
# out here because the chart is not installable offline. A dict lists a section's fields, a
# one-item list an array of such sections; None is a leaf or a Kubernetes object (pod resources,
# env entries), which the chart passes through and whose bodies are validated above.
_IMAGE = {"repository": None, "tag": None, "pullPolicy": None}
CHART_FIELDS = {
    "dagster-user-deployments": {
        "enabled": None, "enableSubchart": None, "imagePullSecrets": None,
        "deployments": [{
            "name": None, "image": _IMAGE, "port": None, "dagsterApiGrpcArgs": None, "codeServerArgs": None,
            "includeConfigInLaunchedRuns": {"enabled": None}, "deploymentNamespace": None, "env": None,
            "envConfigMaps": None, "envSecrets": None, "annotations": None, "nodeSelector": None, "affinity": None,
            "tolerations": None, "podSecurityContext": None, "securityContext": None, "resources": None,
            "livenessProbe": None, "readinessProbe": None, "startupProbe": None, "labels": None,
            "volumeMounts": None, "volumes": None, "schedulerName": None, "initContainers": None,
            "sidecarContainers": None,
        }],
    },
    "postgresql": {
        "image": _IMAGE, "enabled": None, "postgresqlHost": None, "postgresqlUsername": None,
        "postgresqlPassword": None, "postgresqlDatabase": None, "postgresqlParams": None, "postgresqlScheme": None,
        "service": {"port": None},
    },
    "generatePostgresqlPasswordSecret": None,
    "runLauncher": {
        "type": None,
        "config": {
            "celeryK8sRunLauncher": None, "customRunLauncher": None,
            "k8sRunLauncher": {
                "image": _IMAGE, "imagePullPolicy": None, "jobNamespace": None, "loadInclusterConfig": None,
                "kubeconfigFile": None, "envConfigMaps": None, "envSecrets": None, "envVars": None,
                "volumeMounts": None, "volumes": None, "labels": None, "failPodOnRunFailure": None,
                "resources": None, "schedulerName": None, "securityContext": None,
                "runK8sConfig": {"containerConfig": None, "podSpecConfig": None, "podTemplateSpecMetadata": None,
                                 "jobSpecConfig": None, "jobMetadata": None},
            },
        },
    },
    "dagsterDaemon": {
        "enabled": None, "image": _IMAGE, "heartbeatTolerance": None, "env": None, "envConfigMaps": None,
        "envSecrets": None, "resources": None, "nodeSelector": None, "tolerations": None, "annotations": None,
        "runCoordinator": {
            "enabled": None, "type": None,
            "config": {
                "customRunCoordinator": None,
                "queuedRunCoordinator": {"maxConcurrentRuns": None, "tagConcurrencyLimits": None,
                                         "dequeueIntervalSeconds": None, "dequeueNumWorkers": None,
                                         "dequeueUseThreads": None, "blockOpConcurrencyLimitedRuns": None},
            },
        },
        # The chart's instance template reads these keys of runMonitoring and runRetries.
        "runMonitoring": {"enabled": None, "startTimeoutSeconds": None, "cancelTimeoutSeconds": None,
                          "maxResumeRunAttempts": None, "pollIntervalSeconds": None,
                          "freeSlotsAfterRunEndSeconds": None},
        "runRetries": {"enabled": None, "maxRetries": None, "retryOnAssetOrOpFailure": None},
    },
    "concurrency": {
        "enabled": None,
        "pools": {"defaultLimit": None, "granularity": None, "opGranularityRunBuffer": None},
        "runs": {"maxConcurrentRuns": None, "tagConcurrencyLimits": None},
    },
    "telemetry": {"enabled": None},
}
CHART_ENUMS = {
    "runLauncher.type": {"CeleryK8sRunLauncher", "K8sRunLauncher", "CustomRunLauncher"},
    "dagsterDaemon.runCoordinator.type": {"QueuedRunCoordinator", "CustomRunCoordinator"},
}
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}


def unknown_fields(values, fields, path: str = "") -> list[str]:
    """Paths in `values` that `fields` does not list."""
    if fields is None:
        return []
    if isinstance(fields, list):
        return [bad for i, item in enumerate(values) for bad in unknown_fields(item, fields[0], f"{path}[{i}]")]
    found = []
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        found += [where] if key not in fields else unknown_fields(value, fields[key], where)
    return found


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def test_the_helm_values_use_only_fields_of_the_chart(helm_values):
    assert unknown_fields(helm_values, CHART_FIELDS) == []
    for path, allowed in CHART_ENUMS.items():
        value = helm_values
        for key in path.split("."):
            value = value[key]
        assert value in allowed, path
    assert all(d["image"]["pullPolicy"] in PULL_POLICIES for d in helm_values["dagster-user-deployments"]["deployments"])
    # The chart refuses both places for the run limit at once.
    assert not (helm_values["concurrency"].get("runs", {}).get("maxConcurrentRuns")
                and helm_values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"].get("maxConcurrentRuns"))


def test_the_helm_values_name_the_image_the_dockerfile_builds_and_agree_with_the_instance(helm_values):
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    module = re.search(r'^module_name = "([\w.]+)"', pyproject, re.M).group(1)
    (code,) = helm_values["dagster-user-deployments"]["deployments"]
    image = f"{code['image']['repository']}:{code['image']['tag']}"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"docker build -f deploy/Dockerfile -t {image} ." in dockerfile
    assert code["image"]["tag"] == version
    assert code["dagsterApiGrpcArgs"] == ["-m", module] and module == "lora_pipeline.definitions"
    assert f'"-p", "{code["port"]}", "-m", "{module}"' in dockerfile
    assert {"name": deploy.EXECUTOR_ENV, "value": "k8s"} in code["env"] and code["includeConfigInLaunchedRuns"]["enabled"]
    assert '"dagster-postgres==0.29.27"' in pyproject and '"dagster-k8s==0.29.27"' in pyproject  # in the image
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    assert helm_values["concurrency"]["pools"]["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]


def test_the_helm_run_launcher_builds_a_valid_run_job_with_no_gpu(helm_values):
    """The chart's K8sRunLauncher settings, given to dagster-k8s as the chart's instance template does."""
    config = helm_values["runLauncher"]["config"]["k8sRunLauncher"]
    (code,) = helm_values["dagster-user-deployments"]["deployments"]
    launcher = make_launcher(
        service_account_name="dagster", instance_config_map="dagster-instance", dagster_home="/opt/dagster/dagster_home",
        postgres_password_secret="dagster-postgresql-secret", job_namespace="dagster",
        job_image=f"{code['image']['repository']}:{code['image']['tag']}",
        image_pull_policy=config["imagePullPolicy"], env_secrets=[s["name"] for s in config["envSecrets"]],
        run_k8s_config={"container_config": config["runK8sConfig"]["containerConfig"]},
    )
    job = run_worker_job(launcher)
    validate(job)
    validate(pod_of(job))
    assert gpus(pod_of(job)["spec"]) == 0
    assert deploy.GPU_RESOURCE not in json.dumps(helm_values["runLauncher"])
