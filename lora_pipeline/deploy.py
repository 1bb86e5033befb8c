"""Kubernetes placement of the stages: the `dagster-k8s/config` op tags and the opt-in step executor.

Each stage of a run on Kubernetes is its own pod (dagster-k8s' `k8s_job_executor`). Only the stages
in the `gpu` pool (quantized_base, trained_adapter, merged_model, eval_report, champion) ask for
GPUs, land on GPU nodes and get a memory-backed /dev/shm (PyTorch data loader workers and NCCL pass
tensors through shared memory, and a container's default /dev/shm is 64 MB). Data stages and the
run worker ask for no GPU, so they never hold one while tokenizing.

Nothing here is read by a local run: the tags ride along on every asset and only dagster-k8s reads
them. deploy/helm/values.yaml and deploy/dagster.yaml are the other half of the deployment;
tests/test_deploy.py builds the Job bodies dagster-k8s makes from these tags and validates them.
"""

import json
import os

import dagster as dg

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
# Set by NVIDIA's GPU feature discovery (part of the GPU operator) on every node with a GPU.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
# GPU node pools are usually tainted so that CPU work stays off them (GKE and AKS taint them by
# default); the GPU stages tolerate that taint, nothing else does.
GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
SHM_VOLUME = "dshm"
# One GPU per GPU stage, but trained_adapter, which asks for one per torchrun process
# ($LORA_PIPELINE_TRAINING_GPUS); a launch can also override any stage with the executor's
# `per_step_k8s_config` run config, e.g. {trained_adapter: {container_config: {resources:
# {limits: {nvidia.com/gpu: 4}}}}}.
GPUS_PER_STEP = 1

# GPUs trained_adapter's pod asks for on Kubernetes: one per torchrun process (training.distributed.
# nproc_per_node 'auto' takes every GPU the pod sees). Read when the code location loads.
TRAINING_GPUS_ENV = "LORA_PIPELINE_TRAINING_GPUS"

EXECUTOR_ENV = "LORA_PIPELINE_EXECUTOR"
EXECUTORS = ("in_process", "multiprocess", "k8s")


def gpu_step_k8s_config(processes: int = GPUS_PER_STEP) -> dict:
    """The dagster-k8s user-defined config of a GPU stage's pod: `processes` GPUs (one per process
    of the step), the GPU node selector and toleration, and /dev/shm in memory."""
    if processes < 1:
        raise ValueError(f"a GPU stage needs at least one GPU, not {processes}")
    # Extended resources such as GPUs are not overcommitted: a limit alone is the request.
    return {
        "container_config": {
            "resources": {"limits": {GPU_RESOURCE: processes}},
            "volume_mounts": [{"name": SHM_VOLUME, "mount_path": "/dev/shm"}],
        },
        "pod_spec_config": {
            "node_selector": GPU_NODE_SELECTOR,
            "tolerations": GPU_TOLERATIONS,
            # Memory-backed, so it counts against the pod's memory limit, which bounds it.
            "volumes": [{"name": SHM_VOLUME, "empty_dir": {"medium": "Memory"}}],
        },
    }


def training_gpus() -> int:
    """The GPUs of trained_adapter's pod: $LORA_PIPELINE_TRAINING_GPUS, else one."""
    value = os.environ.get(TRAINING_GPUS_ENV, "").strip()
    if not value:
        return GPUS_PER_STEP
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{TRAINING_GPUS_ENV}={value!r}: a positive number of GPUs")
    return int(value)


def k8s_step_tags(uses_gpu: bool, processes: int = GPUS_PER_STEP) -> dict[str, str]:
    """Op tags that place a stage's pod: the GPU config for GPU stages, none for the others (they
    take the run launcher's defaults, which request no GPU)."""
    return {K8S_CONFIG_TAG: json.dumps(gpu_step_k8s_config(processes), sort_keys=True)} if uses_gpu else {}


def step_executor() -> dg.ExecutorDefinition | None:
    """The executor named by $LORA_PIPELINE_EXECUTOR, read when the code location loads.

    Unset (the CLI, the demo, `dg dev`): None, Dagster's default, which runs the steps in the run
    worker. `k8s` (set in deploy/helm/values.yaml): dagster-k8s' k8s_job_executor, one pod per step;
    dagster-k8s is imported only then, so a local install does not need it.
    """
    name = os.environ.get(EXECUTOR_ENV, "").strip()
    if not name:
        return None
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    raise ValueError(f"${EXECUTOR_ENV}={name!r} is not one of {', '.join(EXECUTORS)}")
