"""Benchmark tasks through lm-evaluation-harness, run in-process on a model that is already loaded.

Tasks are lm-eval task YAML files. The project ships one smoke-test task (SHIPPED_TASK, in
SHIPPED_TASKS_DIR) and a caller may add folders of their own with `include_path`; a name found in
neither is looked up among lm-eval's built-in tasks (gsm8k, mmlu, ...), which need the network for
their datasets. Building lm-eval's full task index costs about 35 seconds, so it is built only
when a requested name is not local and does occur in lm-eval's task files. Dagster-free.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SHIPPED_TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
SHIPPED_TASK = "lora_pipeline_tiny_mc"

# Keys of an lm-eval result row that describe the task rather than measure it.
_NOT_METRICS = {"name", "alias", "sample_len"}
# Stderr of metrics without a closed form is bootstrapped; lm-eval's default of 100,000 draws
# takes longer than the evaluation of a small task, and 1,000 gives two significant digits.
_BOOTSTRAP_ITERS = 1000


def run_benchmarks(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a loaded model (a transformers model or a peft PeftModel) on lm-eval tasks.

    `tasks` are task, group or tag names, or paths to task YAML files. Tasks are looked up in
    SHIPPED_TASKS_DIR, then in `include_path` (a folder of task YAML, which wins on a name clash),
    then among lm-eval's built-in tasks. The model runs on its current device and is not
    reloaded; its train/eval mode and the global random generators are as they were afterwards.
    `limit` caps the examples per task (for smoke tests; a capped score is not comparable).

    Returns {task: {metric: value, f"{metric}_stderr": value}} as plain floats (nan where lm-eval
    cannot compute a stderr). Metrics under lm-eval's default filter are named plainly ("acc");
    under a named filter they keep lm-eval's "metric,filter" name. lm-eval's log records go to
    `log` when one is given and are silenced otherwise.

    Raises ValueError naming a task that is found nowhere, and where it was looked for.
    """
    if not tasks:
        raise ValueError("run_benchmarks: no tasks given")
    emit = log or (lambda message: None)
    started = time.perf_counter()
    folders = [SHIPPED_TASKS_DIR] + ([Path(include_path).expanduser().resolve()] if include_path else [])
    with _lm_eval_logging(log), _caller_state_kept(model):
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        manager, specs = _task_specs(tasks, folders, emit)
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=harness_model,
            tasks=specs,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=_BOOTSTRAP_ITERS,
            # Per-example records are not returned; keeping them only costs memory.
            log_samples=False,
        )
    scores = {task: _metrics(row) for task, row in results["results"].items()}
    emit(f"benchmarks: {', '.join(scores)} in {time.perf_counter() - started:.1f}s")
    return scores


def _task_specs(tasks: list[str], folders: list[Path], emit: Callable[[str], None]):
    """The TaskManager to load `tasks` with, and what to pass it for each (a name or a config)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(folder) for folder in folders], include_defaults=False)
    missing = [name for name in tasks if name not in manager.task_index and not _is_yaml_file(name)]
    if missing:
        # Any name in lm-eval's index is written in one of its YAML files, so a name that occurs
        # in none is unknown: say so in a second instead of building the index to find out.
        unknown = [name for name in missing if not _mentioned_in_builtin_tasks(name)]
        if not unknown:
            emit(f"benchmarks: loading lm-eval's built-in task index for {', '.join(missing)}")
            manager = TaskManager(include_path=[str(folder) for folder in folders], include_defaults=True)
            unknown = [name for name in missing if name not in manager.task_index]
        if unknown:
            raise ValueError(
                f"benchmark task(s) {', '.join(map(repr, unknown))} not found: looked in "
                f"{', '.join(str(folder) for folder in folders)} and among lm-eval's built-in tasks. "
                "Add a task YAML to a folder given as include_path, or check the name "
                "(`lm_eval ls tasks` lists the built-in ones)."
            )
    return manager, [_spec(name, manager) for name in tasks]


def _spec(name: str, manager) -> str | dict[str, Any]:
    """A task's full config with its data files made absolute, or the name where that does not apply.

    datasets resolves a relative `data_files` against the working directory, while a task folder
    means it relative to its YAML; a config dict is the one way to hand lm-eval the corrected
    paths without copying the folder. Groups and tags pass by name, so their member tasks need
    absolute data paths.
    """
    from lm_eval.tasks._index import Kind
    # Private to lm-eval (pinned in pyproject.toml): its loader resolves `include:` and `!function`
    # exactly as the harness does, which a plain yaml.safe_load would not.
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is not None and entry.kind is Kind.TASK and entry.yaml_path is not None:
        path = Path(entry.yaml_path)
    elif entry is None and _is_yaml_file(name):
        path = Path(name).expanduser().resolve()
    else:
        return name
    config = load_yaml(path, resolve_func=True)
    if "task" not in config:  # a group or tag file named by path: lm-eval loads those itself
        return str(path)
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if kwargs.get(key) is not None:
                kwargs[key] = _absolute(kwargs[key], path.parent)
    return config


def _absolute(files, folder: Path):
    """data_files (a path, a list of them, or a split -> path(s) mapping) with relative local paths under folder."""
    if isinstance(files, dict):
        return {split: _absolute(value, folder) for split, value in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute(value, folder) for value in files]
    if isinstance(files, str) and "://" not in files and not Path(files).expanduser().is_absolute():
        return str(folder / files)
    return files


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file()


def _mentioned_in_builtin_tasks(name: str) -> bool:
    """Whether the name occurs as a word in any of lm-eval's own task YAML files (about 0.7 s)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        return False
    word = re.compile(r"(?<![\w.-])" + re.escape(name) + r"(?![\w.-])")
    for path in (Path(spec.origin).parent / "tasks").rglob("*.yaml"):
        if word.search(path.read_text(encoding="utf-8", errors="replace")):
            return True
    return False


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """One lm-eval result row as {metric: float}: ',none' dropped, 'N/A' as nan, descriptions left out."""
    values = {}
    for key, value in row.items():
        if key in _NOT_METRICS:
            continue
        metric, _, filter_name = key.partition(",")
        name = metric if filter_name in ("", "none") else key
        try:
            values[name] = float(value)
        except (TypeError, ValueError):
            # lm-eval writes "N/A" for a stderr it cannot compute (one example, no closed form).
            values[name] = math.nan
    return values


@contextmanager
def _lm_eval_logging(log: Callable[[str], None] | None) -> Iterator[None]:
    """lm-eval's log records to `log` (INFO and up), or nowhere below ERROR without one."""
    logger = logging.getLogger("lm_eval")
    saved = (logger.level, logger.propagate)
    handler: logging.Handler | None = None
    if log is not None:
        handler = _CallbackHandler(log)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        # The caller's callback is where the user reads them; the root logger would repeat them.
        logger.propagate = False
    else:
        # It warns on every call that a pre-loaded model ignores its loading options, which is
        # how this module means to use it.
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class _CallbackHandler(logging.Handler):
    def __init__(self, callback: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        self.callback(f"lm-eval: {record.getMessage()}")


@contextmanager
def _caller_state_kept(model) -> Iterator[None]:
    """Restore the model's train/eval mode and the global random generators after lm-eval.

    HFLM puts the model in eval mode and simple_evaluate reseeds python, numpy and torch; a
    benchmark run between training steps must not change what the training does next.
    """
    import random

    import numpy as np
    import torch

    training = getattr(model, "training", False)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if hasattr(model, "train"):
            model.train(training)
