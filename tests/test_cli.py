"""The lora-pipeline command: help, one-line errors, --json summary, validate, list, the demo's acceptance."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _cli(args, tmp_path, check_rc=None, env=None):
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "LORA_PIPELINE_STORAGE": str(tmp_path / "store"),
        **(env or {}),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "lora_pipeline.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )
    if check_rc is not None:
        assert completed.returncode == check_rc, completed.stderr[-3000:]
    return completed


def test_help_explains_commands_and_selection(tmp_path):
    out = _cli(["run", "--help"], tmp_path, check_rc=0).stdout
    assert "--select" in out and "+name" in out and "--set" in out and "--storage" in out and "--json" in out
    assert "by default all 7 stages: raw_dataset, formatted_dataset," in out
    assert "%%" not in _cli(["validate", "--help"], tmp_path, check_rc=0).stdout


def test_a_config_error_is_one_line_naming_file_and_key(tmp_path, write_config):
    path = write_config("micro", lora={"r": 0})
    result = _cli(["run", str(path)], tmp_path, check_rc=2)
    assert result.stderr.strip().count("\n") == 0
    assert "micro.yaml" in result.stderr and "'lora.r'" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_override_key_is_named(tmp_path, write_config):
    result = _cli(["validate", str(write_config("micro")), "--set", "training.epoch=2"], tmp_path, check_rc=2)
    assert "unknown key 'training.epoch', did you mean 'epochs'? (known here: epochs, max_steps," in result.stderr


def test_a_missing_local_dataset_is_file_not_found_at_validate(tmp_path, write_config):
    for source in ("data/train.json", "nosuchdir/part-*.jsonl", "owner/nothing.jsonl"):
        result = _cli(["validate", str(write_config("micro", dataset={"source": source}))], tmp_path, check_rc=2)
        assert f"{source}: dataset not found" in result.stderr and "hub" not in result.stderr.split(";")[0]


def test_validate_strict_refuses_a_plan_that_does_not_fit(tmp_path, write_config):
    path = write_config("micro")
    assert _cli(["validate", str(path), "--strict"], tmp_path, check_rc=0)
    huge = ["--set", "training.batch_size=65536", "--set", "training.max_length=8192"]  # terabytes of activations
    plain = _cli(["validate", str(path), *huge], tmp_path, check_rc=0)
    assert "does NOT fit" in plain.stdout
    strict = _cli(["validate", str(path), "--strict", *huge], tmp_path, check_rc=2)
    assert "--strict: the memory plan of micro does not fit this machine" in strict.stderr


def test_bad_data_fails_before_any_model_is_loaded_and_publishes_nothing(tmp_path, write_config):
    data = tmp_path / "broken.json"
    data.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]')
    path = write_config("micro", dataset={"source": str(data)})
    result = _cli(["run", str(path)], tmp_path, check_rc=2)
    assert "broken.json: row 1: missing field 'output'" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "store" / "micro").exists()


def test_validate_reports_rows_without_training(tmp_path, write_config):
    result = _cli(["validate", str(write_config("micro")), "--json"], tmp_path, check_rc=0)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["partition"] == "micro" and summary["train_rows"] + summary["eval_rows"] == 160


@pytest.mark.slow
def test_run_json_summary_then_list(tmp_path, write_config):
    path = write_config("micro", quantization={"mode": "none"})
    result = _cli(["run", str(path), "--json", "--set", "training.max_steps=4"], tmp_path, check_rc=0)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["partition"] == "micro" and summary["run_id"]
    assert list(summary["assets"]) == [
        "raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report",
        "champion",
    ]
    assert summary["assets"]["trained_adapter"]["metadata"]["steps"] == 4
    metrics = json.loads((Path(summary["assets"]["eval_report"]["uri"]) / "metrics.json").read_text())
    assert {"loss", "perplexity"} <= set(metrics["base"]) and {"loss", "perplexity"} <= set(metrics["merged"])
    assert "step 2/4 loss" in result.stderr  # training progress reaches the terminal

    rerun = _cli(["run", str(path), "--json", "--select", "eval_report"], tmp_path, check_rc=0)
    assert list(json.loads(rerun.stdout.strip().splitlines()[-1])["assets"]) == ["eval_report"]

    listing = _cli(["list", "--json"], tmp_path, check_rc=0)
    rows = {row["model"]: row for row in json.loads(listing.stdout)}
    assert all(rows["micro"]["materialized"].values())


def test_list_names_the_assets_an_edit_of_the_config_made_stale(tmp_path, write_config):
    import yaml

    path = write_config("micro")
    env = {"LORA_PIPELINE_CONFIG_DIR": str(path.parent)}
    _cli(["run", str(path), "--select", "raw_dataset,formatted_dataset"], tmp_path, check_rc=0, env=env)

    def listed():
        [row] = json.loads(_cli(["list", "--json"], tmp_path, check_rc=0, env=env).stdout)
        return row

    assert listed()["stale"] == []
    data = yaml.safe_load(path.read_text())
    data["dataset"]["template"] = "chatml"  # formatting changes, the rows read do not
    path.write_text(yaml.safe_dump(data))
    row = listed()
    assert row["stale"] == ["formatted_dataset"] and row["materialized"]["raw_dataset"]
    text = _cli(["list"], tmp_path, check_rc=0, env=env).stdout
    assert "2/7 assets, 1 stale" in text and "stale: formatted_dataset" in text


@pytest.mark.slow
def test_the_demo_meets_its_acceptance_figures(tmp_path):
    """`make demo`'s config: adapter held-out loss >= 20% below base, merged within 1% of the adapter; then tiny-dpo."""
    result = _cli(["run", "configs/tiny-demo.yaml", "--json"], tmp_path, check_rc=0)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((Path(summary["assets"]["eval_report"]["uri"]) / "metrics.json").read_text())
    assert metrics["adapter"]["loss"] <= 0.8 * metrics["base"]["loss"]
    assert abs(metrics["merged"]["loss"] - metrics["adapter"]["loss"]) <= 0.01 * metrics["adapter"]["loss"]
    assert "report:" in result.stderr
    # The README's figures are this run's (`make readme-figures` writes them): the same loss, the same numbers.
    ours, readme = (re.search(r"held-out loss \(per-example mean\): (.*)", text).group(1)
                    for text in (result.stderr + result.stdout, (REPO / "README.md").read_text()))
    figures = [[float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)] for line in (ours, readme)]
    assert figures[0] == pytest.approx(figures[1], abs=2e-3), "README's demo figures are stale: make readme-figures"
    assert metrics["adapter"]["loss"] == pytest.approx(figures[0][1], abs=1e-4)  # metrics.json's loss is that one
    # validate counts what the trainer trains (the built-in base's vocabulary is trained on the data).
    trained = json.loads((Path(summary["assets"]["trained_adapter"]["uri"]) / "training_summary.json").read_text())
    plan = json.loads(_cli(["validate", "configs/tiny-demo.yaml", "--json"], tmp_path, check_rc=0).stdout)["memory_plan"]
    assert plan["trainable_parameters"] == trained["trainable_parameters"]

    # configs/tiny-dpo.yaml on top of its champion: held-out preference accuracy above the reference's beyond
    # the paired interval, every gate passed.
    dpo = json.loads(_cli(["run", "configs/tiny-dpo.yaml", "--json"], tmp_path, check_rc=0).stdout.strip().splitlines()[-1])
    preference = json.loads((Path(dpo["assets"]["eval_report"]["uri"]) / "metrics.json").read_text())
    versus_reference = preference["comparison"]["paired"][0]
    assert (versus_reference["metric"], versus_reference["reference"]) == ("preference_accuracy", "reference")
    assert versus_reference["difference"]["ci95"][0] > 0
    assert dpo["champion"]["promoted"] and all(gate["passed"] for gate in dpo["champion"]["gates"].values())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", ["raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report",
               "champion"]),
        ("+trained_adapter", ["raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter"]),
        ("raw_dataset,formatted_dataset", ["raw_dataset", "formatted_dataset"]),
        ("trained_adapter+", ["trained_adapter", "merged_model", "eval_report", "champion"]),
        ("key:merged_model or key:eval_report", ["merged_model", "eval_report"]),
        ("1+key:trained_adapter", ["formatted_dataset", "quantized_base", "trained_adapter"]),
        # What a change of the adapter's settings re-runs; the settings assets themselves are never run.
        ("key:trained_adapter_settings+", ["trained_adapter", "merged_model", "eval_report", "champion"]),
        ("key:merged_model_settings", []),
    ],
)
def test_selection_syntax(text, expected):
    from lora_pipeline.cli.selection import selected_asset_names, selection

    assert selected_asset_names(selection(text)) == expected


def test_an_unknown_asset_in_the_selection_is_a_config_error():
    from lora_pipeline.cli.selection import selected_asset_names, selection
    from lora_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no stage named 'trained_adaptor'; did you mean 'trained_adapter'\? "
                                          r"the stages are raw_dataset, formatted_dataset, "):
        selected_asset_names(selection("+trained_adaptor"))
    with pytest.raises(ConfigError, match="--select"):
        selection("key:(broken")


def test_debug_is_honoured_before_or_after_the_command():
    from lora_pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--debug", "list"]).debug
    assert parser.parse_args(["list", "--debug"]).debug
    assert not parser.parse_args(["list"]).debug


def test_the_libraries_progress_bars_are_off_without_importing_them():
    """The CLI silences transformers' and datasets' bars before they are imported (importing them costs 1.6 s
    that commands which load no model would pay), and they honour it when a stage imports them."""
    probe = (
        "import sys, json\n"
        "from lora_pipeline.cli.session import quiet_libraries\n"
        "quiet_libraries()\n"
        "imported = [name for name in ('transformers', 'datasets') if name in sys.modules]\n"
        "from transformers.utils import logging\n"
        "from datasets.utils.tqdm import are_progress_bars_disabled\n"
        "print(json.dumps([imported, logging.is_progress_bar_enabled(), are_progress_bars_disabled()]))\n"
    )
    env = {name: value for name, value in os.environ.items() if "PROGRESS_BARS" not in name}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert json.loads(out.stdout) == [[], False, True]


FORMAT_SAMPLES = {
    "alpaca.json": json.dumps([{"instruction": f"Name {i}", "input": "", "output": f"Number {i}"} for i in range(40)]),
    "sharegpt.jsonl": "".join(json.dumps({"conversations": [{"from": "human", "value": f"Hi {i}"},
                                                            {"from": "gpt", "value": f"Hello {i}"}]}) + "\n"
                              for i in range(40)),
    "messages.jsonl": "".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                                       {"role": "assistant", "content": f"Hello {i}"}]}) + "\n"
                              for i in range(40)),
    "prompt_completion.csv": "prompt,completion\n" + "".join(f"Count to {i}:, {i}\n" for i in range(40)),
    "text.txt": "".join(f"Plain line number {i}.\n" for i in range(40)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMAT_SAMPLES))
def test_the_data_stages_accept_each_format_a_user_brings(tmp_path, write_config, name):
    """`run CONFIG --select raw_dataset,formatted_dataset --set dataset.source=X --set dataset.format=auto`."""
    data = tmp_path / name
    data.write_text(FORMAT_SAMPLES[name])
    result = _cli(
        ["run", str(write_config("micro")), "--select", "raw_dataset,formatted_dataset", "--json",
         "--set", f"dataset.source={data}", "--set", "dataset.format=auto", "--set", "dataset.max_rows=null"],
        tmp_path, check_rc=0,
    )
    assets = json.loads(result.stdout.strip().splitlines()[-1])["assets"]
    expected = name.split(".")[0]
    assert assets["raw_dataset"]["metadata"]["format"] == expected
    assert assets["raw_dataset"]["metadata"]["format_detected"] is True
    formatted = assets["formatted_dataset"]["metadata"]
    assert formatted["format"] == expected and formatted["train_rows"] + formatted["eval_rows"] == 40
    assert "40 rows -> " in result.stderr  # the rows-per-step line reaches the terminal


def test_a_failed_data_check_is_one_line_and_stops_the_run(tmp_path, write_config):
    path = write_config("micro", training={"max_length": 30})  # the sample's examples have 23-50 tokens
    result = _cli(["run", str(path), "--select", "raw_dataset,formatted_dataset,quantized_base"], tmp_path, check_rc=2)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: formatted_dataset check examples_are_trainable:")
    assert "longer than training.max_length" in error and "dataset.max_truncation_rate" in error
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_sigkilled_training_run_resumes_from_its_last_checkpoint(tmp_path, write_config, processes):
    """Kill -9 after the first checkpoint, launch again: same number of optimizer steps, a loadable adapter.
    With two torchrun ranks, the orphaned ranks stop by themselves."""
    import signal
    import time

    from test_distributed import _worker_processes

    path = write_config("micro", quantization={"mode": "nf4"},
                        training={"max_steps": 40, "checkpoint_every": 5, "logging_steps": 5,
                                  "distributed": {"nproc_per_node": processes}})
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    command = [sys.executable, "-m", "lora_pipeline.cli", "run", str(path), "--select", "+trained_adapter", "--json"]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "store" / "micro" / "trained_adapter" / ".checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not list(checkpoints.glob("*/step-*/MANIFEST.json")):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    saved = list(checkpoints.glob("*/step-*/MANIFEST.json"))
    assert saved and first.returncode == -signal.SIGKILL, "the first run ended before its first checkpoint"
    assert not (tmp_path / "store" / "micro" / "trained_adapter" / "CURRENT.json").exists()
    deadline = time.time() + 60
    while _worker_processes("lora_pipeline.torchrun.worker") and time.time() < deadline:
        time.sleep(0.5)
    assert not _worker_processes("lora_pipeline.torchrun.worker"), "orphaned ranks still running"

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    meta = json.loads(second.stdout.strip().splitlines()[-1])["assets"]["trained_adapter"]["metadata"]
    assert meta["resumed_from_step"] >= 5 and meta["steps"] == 40 and meta["world_size"] == processes
    assert "resuming from the checkpoint at step" in second.stderr
    assert "was killed" in second.stderr  # its gpu pool slot was freed, or this run would wait forever
    assert not list(checkpoints.glob("*/step-*"))  # dropped once the adapter is published

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(json.loads(second.stdout.strip().splitlines()[-1])["assets"]
                                                ["quantized_base"]["uri"])
    PeftModel.from_pretrained(base, meta["uri"])


@pytest.mark.slow
def test_a_canary_secret_appears_nowhere(tmp_path, write_config, s3_bucket):
    """Credentials come from the AWS variables and never reach logs, the event log, the store or the output."""
    bucket, fs = s3_bucket
    canary = "canary-secret-7f3a9c21e5"
    path = write_config("micro", quantization={"mode": "none"}, training={"max_steps": 4, "checkpoint_every": 2})
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "AWS_SECRET_ACCESS_KEY": canary,
           "AWS_ACCESS_KEY_ID": "canary-key-id"}
    result = subprocess.run(
        [sys.executable, "-m", "lora_pipeline.cli", "run", str(path), "--storage", f"s3://{bucket}/lora", "--json",
         "--debug"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert canary not in result.stdout and canary not in result.stderr
    for file in (tmp_path / "dagster_home").rglob("*"):
        if file.is_file():
            assert canary.encode() not in file.read_bytes(), file
    objects = fs.find(f"{bucket}/lora")
    assert any(name.endswith("MANIFEST.json") for name in objects)
    for name in objects:
        assert canary.encode() not in fs.cat_file(name), name


def test_validate_checks_every_variant_of_a_sweep(tmp_path):
    result = _cli(["validate", "configs/tiny-sweep.yaml", "--json"], tmp_path, check_rc=0)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sweep"] == "tiny-sweep"
    assert [variant["partition"] for variant in summary["variants"]] == ["tiny-sweep.r4", "tiny-sweep.r16", "tiny-sweep.r64"]
    assert all(variant["train_rows"] > 0 for variant in summary["variants"])
