"""Dagster's `dg` command loads, lists and launches the project, as docs/tutorials/first-run.md shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DG = Path(sys.executable).parent / "dg"
STAGES = {"raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report"}


def _run(command: list[str], home: Path, storage: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home), "LORA_PIPELINE_STORAGE": str(storage),
           "VIRTUAL_ENV": str(Path(sys.executable).parents[1])}
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _dg(*args: str, home: Path, storage: Path) -> subprocess.CompletedProcess:
    return _run([str(DG), *args], home, storage)


def test_dg_checks_lists_and_launches_the_pipeline(tmp_path):
    home, storage = tmp_path / "dagster", tmp_path / "store"
    checked = _dg("check", "defs", home=home, storage=storage)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    assert "does not match the virtual environment" not in checked.stdout + checked.stderr

    listed = _dg("list", "defs", "--json", home=home, storage=storage)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assets = {asset["asset_key"] for asset in json.loads(listed.stdout)["assets"]}
    assert STAGES <= assets

    # The configs become partitions when the instance first sees them (make ui does this first).
    registered = _run([sys.executable, "-m", "lora_pipeline.cli", "list"], home, storage)
    assert registered.returncode == 0, registered.stderr[-3000:]
    launched = _dg("launch", "--assets", "raw_dataset", "--partition", "tiny-demo", home=home, storage=storage)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "RUN_SUCCESS" in launched.stdout + launched.stderr
    assert list((storage / "tiny-demo" / "raw_dataset").iterdir())  # the stage published its rows
