"""The Dagster UI on this code location: the webserver's GraphQL API and the asset graph page.

A module-scoped fixture starts `dagster-webserver -w workspace.yaml` on a free port of 127.0.0.1
with a temporary DAGSTER_HOME whose `models` partitions were registered by `lora-pipeline list`,
as `make ui` does. The browser test drives Debian's Chromium (/usr/bin/chromium, installed by
`make install`/`make test` as root) with Playwright and saves a screenshot of the asset graph to
$UI_SCREENSHOT_DIR (or the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG_DIR = REPO / "configs"
LOCATION = "lora_pipeline.definitions"
ASSETS = ["raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report",
          "champion"]
GROUPS = {
    "raw_dataset": "data", "formatted_dataset": "data", "quantized_base": "model",
    "trained_adapter": "model", "merged_model": "model", "eval_report": "evaluation", "champion": "decision",
}
CHECKS = {
    "raw_dataset": {"rows_match_format"},
    "formatted_dataset": {"examples_are_trainable", "train_eval_disjoint"},
    "champion": {"better_than_base", "no_regression", "forgetting", "merge_fidelity", "servable", "template_fidelity",
                 "recommended"},
}
# Partitioned by sweep, not by model: each sweep file's leaderboard.
SWEEP_ASSETS = [("leaderboard",)]
# On demand, after the stage they hand off: partitioned by model, each in its own job, never in `tune`.
ON_DEMAND_JOBS = {("published_model",): "publish", ("gguf_export",): "export"}
ON_DEMAND_ASSETS = list(ON_DEMAND_JOBS)
# Edges every version of the graph has (an asset may read more upstream assets than these).
EDGES = [
    ("raw_dataset", "formatted_dataset"),
    ("formatted_dataset", "trained_adapter"),
    ("quantized_base", "trained_adapter"),
    ("trained_adapter", "merged_model"),
    ("merged_model", "eval_report"),
    ("eval_report", "champion"),
]
# The settings each stage reads (<stage>_settings, observed, never run): each stage depends on its own.
SETTINGS = [(f"{name}_settings",) for name in ASSETS]
CONFIG_SECTIONS = ["dataset", "lora", "quantization", "training", "merge", "eval"]
STARTUP_TIMEOUT = 120  # importing torch/transformers for the code location takes a while on 2 cores

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which the
# closed network of the CI machines refuses. Playwright gives it a fresh profile every launch.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name jobs { name description } } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

ASSETS_QUERY = """
query Assets {
  assetNodes {
    assetKey { path }
    description
    groupName
    isPartitioned
    partitionDefinition { type dimensionTypes { dynamicPartitionsDefinitionName } }
    partitionKeysByDimension { name partitionKeys }
    dependencyKeys { path }
    jobNames
    isMaterializable
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name description blocking } }
    }
    configField { name description configType { key } }
  }
}
"""

RUN_CONFIG_SCHEMA_QUERY = """
query RunConfigSchema($selector: PipelineSelector!) {
  runConfigSchemaOrError(selector: $selector) {
    __typename
    ... on RunConfigSchema {
      rootConfigType { key }
      allConfigTypes {
        key
        description
        ... on CompositeConfigType { fields { name description isRequired configTypeKey } }
        ... on NullableConfigType { ofType { key } }
      }
    }
    ... on PythonError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Webserver:
    def __init__(self, url: str, process: subprocess.Popen, log: Path, partitions: list[str]):
        self.url = url
        self.process = process
        self.log = log
        self.partitions = partitions

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.load(response)
        assert not payload.get("errors"), f"GraphQL errors: {payload['errors']}"
        return payload["data"]


def _wait_until_up(server: Webserver) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/server_info", timeout=5) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"dagster-webserver did not answer /server_info in {STARTUP_TIMEOUT}s:\n{server.log_tail()}")
        time.sleep(0.5)
    # /server_info answers before the code location may have finished loading.
    while True:
        entries = server.graphql(WORKSPACE_QUERY)["workspaceOrError"].get("locationEntries") or []
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"code location still loading after {STARTUP_TIMEOUT}s: {entries}\n{server.log_tail()}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    """Stop the webserver and its code server (same process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:  # the code server child may outlive the webserver: take the whole group down
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    webserver_bin = BIN / "dagster-webserver"
    assert webserver_bin.exists(), f"{webserver_bin} missing: `make install` installs dagster-webserver"
    home = tmp_path_factory.mktemp("dagster_home")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LORA_PIPELINE_CONFIG_DIR": str(CONFIG_DIR),
        "LORA_PIPELINE_STORAGE": str(tmp_path_factory.mktemp("store")),
    }

    # Register one `models` partition per configs/*.yaml, as `make ui` does.
    listed = subprocess.run(
        [str(BIN / "lora-pipeline"), "list", "--json"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-4000:]
    partitions = sorted(model["model"] for model in json.loads(listed.stdout.strip().splitlines()[-1]))
    from lora_pipeline.config.registry import ConfigRegistry

    assert partitions == ConfigRegistry(CONFIG_DIR).keys  # a sweep file is one partition per variant
    assert "tiny-sweep.r16" in partitions
    # The instance `lora-pipeline` wrote (as for `make ui`), without the UI's first-visit newsletter dialog.
    instance_yaml = home / "dagster.yaml"
    assert instance_yaml.exists(), "lora-pipeline list did not write dagster.yaml"
    if "nux:" not in instance_yaml.read_text():
        with instance_yaml.open("a") as file:
            file.write("nux:\n  enabled: false\n")

    port = _free_port()
    log = home / "webserver.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(webserver_bin), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Webserver(f"http://127.0.0.1:{port}", process, log, partitions)
    try:
        _wait_until_up(server)
        yield server
    finally:
        _stop(process)


def _config_types(schema: dict) -> dict[str, dict]:
    return {config_type["key"]: config_type for config_type in schema["allConfigTypes"]}


def _field(types: dict[str, dict], type_key: str, name: str) -> dict:
    """The field `name` of the composite type `type_key`, looking through Noneable wrappers."""
    config_type = types[type_key]
    while "fields" not in config_type and config_type.get("ofType"):
        config_type = types[config_type["ofType"]["key"]]
    fields = {field["name"]: field for field in config_type.get("fields") or []}
    assert name in fields, f"{type_key} has no field {name!r}: {sorted(fields)}"
    return fields[name]


def _path(types: dict[str, dict], field: dict, *names: str) -> dict:
    """The field reached from `field` through the nested fields `names`."""
    for name in names:
        field = _field(types, field["configTypeKey"], name)
    return field


def _fields(types: dict[str, dict], type_key: str) -> list[dict]:
    config_type = types[type_key]
    while "fields" not in config_type and config_type.get("ofType"):
        config_type = types[config_type["ofType"]["key"]]
    return config_type["fields"]


@pytest.mark.slow
def test_graphql_lists_assets_partitions_checks_and_config(webserver):
    # The code location loads without an error and has the `tune` job.
    workspace = webserver.graphql(WORKSPACE_QUERY)["workspaceOrError"]
    assert workspace["__typename"] == "Workspace", workspace
    [entry] = workspace["locationEntries"]
    location = entry["locationOrLoadError"]
    assert entry["name"] == LOCATION and entry["loadStatus"] == "LOADED"
    assert location["__typename"] == "RepositoryLocation", location.get("message")
    [repository] = location["repositories"]
    jobs = {job["name"]: job for job in repository["jobs"]}
    assert "tune" in jobs and jobs["tune"]["description"], jobs

    # Exactly the stages, each described, in its group, partitioned by `models`; their settings; the leaderboard.
    nodes = {tuple(node["assetKey"]["path"]): node for node in webserver.graphql(ASSETS_QUERY)["assetNodes"]}
    assert sorted(nodes) == sorted([(name,) for name in ASSETS] + SETTINGS + SWEEP_ASSETS + ON_DEMAND_ASSETS)
    for path in ON_DEMAND_ASSETS:
        assert "tune" not in nodes[path]["jobNames"] and ON_DEMAND_JOBS[path] in nodes[path]["jobNames"], nodes[path]
    for path in SETTINGS:
        node = nodes[path]
        assert node["description"] and "model_configs sensor" in node["description"], (path, node["description"])
        assert node["groupName"] == "settings" and not node["isMaterializable"] and not node["jobNames"], node
        [dimension] = node["partitionKeysByDimension"]
        assert sorted(dimension["partitionKeys"]) == webserver.partitions, (path, dimension)
        assert list(path) in [key["path"] for key in nodes[(path[-1].removesuffix("_settings"),)]["dependencyKeys"]], path
    for name in ASSETS:
        node = nodes[(name,)]
        assert node["description"] and node["description"].strip(), f"{name} has no description"
        assert node["groupName"] == GROUPS[name], (name, node["groupName"])
        assert "tune" in node["jobNames"], (name, node["jobNames"])
        assert node["isPartitioned"], name
        assert node["partitionDefinition"]["type"] == "DYNAMIC", (name, node["partitionDefinition"])
        assert [d["dynamicPartitionsDefinitionName"] for d in node["partitionDefinition"]["dimensionTypes"]] == [
            "models"
        ]
        # The dynamic partitions registered by `lora-pipeline list`: one per configs/*.yaml.
        [dimension] = node["partitionKeysByDimension"]
        assert "tiny-demo" in dimension["partitionKeys"]
        assert sorted(dimension["partitionKeys"]) == webserver.partitions, (name, dimension)
        # Every asset takes the model config as run config (the Launchpad's form).
        assert node["configField"] and node["configField"]["description"], f"{name} has no described config"

        checks = node["assetChecksOrError"]
        assert checks["__typename"] == "AssetChecks", checks
        assert {check["name"] for check in checks["checks"]} == CHECKS.get(name, set()), (name, checks)
        for check in checks["checks"]:
            assert check["description"] and check["blocking"], (name, check)

    for upstream, downstream in EDGES:
        assert [upstream] in [key["path"] for key in nodes[(downstream,)]["dependencyKeys"]], (upstream, downstream)

    # The `tune` job's run config schema documents every field of the model config:
    # ops.<asset>.config.<section>.<field>, as the Launchpad shows them.
    selector = {"repositoryLocationName": LOCATION, "repositoryName": repository["name"], "pipelineName": "tune"}
    schema = webserver.graphql(RUN_CONFIG_SCHEMA_QUERY, {"selector": selector})["runConfigSchemaOrError"]
    assert schema["__typename"] == "RunConfigSchema", schema
    types = _config_types(schema)
    ops = _field(types, schema["rootConfigType"]["key"], "ops")
    for name in ASSETS:
        op = _field(types, ops["configTypeKey"], name)
        config = _field(types, op["configTypeKey"], "config")
        sections = {field["name"]: field for field in _fields(types, config["configTypeKey"])}
        assert set(CONFIG_SECTIONS) <= set(sections), (name, sorted(sections))
        for field in sections.values():
            assert field["description"], f"ops.{name}.config.{field['name']} has no description"
            assert not field["isRequired"], f"ops.{name}.config.{field['name']} is required"
        for section in CONFIG_SECTIONS:
            for field in _fields(types, sections[section]["configTypeKey"]):
                assert field["description"], f"ops.{name}.config.{section}.{field['name']} has no description"
    dataset = _path(types, ops, "raw_dataset", "config", "dataset")
    assert "data" in dataset["description"].lower(), dataset
    source = _path(types, dataset, "source")
    assert "jsonl" in source["description"].lower(), source
    learning_rate = _path(types, ops, "trained_adapter", "config", "training", "learning_rate")
    assert learning_rate["description"], learning_rate


def _wait_stable(locator, timeout: float = 15) -> None:
    """Wait until the element stops moving (the graph zooms to fit after a layout change)."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        box = locator.bounding_box()
        if box is not None and box == previous:
            return
        previous = box
        time.sleep(0.5)


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium binary; fails (does not skip) with how to install it, before the server starts."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} not found: the browser test needs Debian's Chromium. Install it with "
            "`apt-get update && apt-get install -y --no-install-recommends chromium` "
            "(`make install` and `make test` do this when run as root), or set CHROMIUM to a Chromium binary."
        )
    return CHROMIUM


@pytest.mark.slow
def test_asset_graph_page_screenshot(chromium, webserver, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect, sync_playwright

    out_dir = Path(os.environ.get("UI_SCREENSHOT_DIR") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    screenshot = out_dir / "asset-graph.png"

    page_errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            # A large viewport: the graph zooms to fit, and only above a certain zoom level are the
            # nodes drawn in full (checks, partitions, kinds; bare names below it). Wide enough for the
            # columns from raw_dataset's settings to published_model.
            page = browser.new_page(viewport={"width": 2800, "height": 2000})
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(f"{webserver.url}/asset-groups", timeout=60_000)  # "Global asset lineage"
            expect(page.get_by_text("Global asset lineage").first).to_be_visible(timeout=60_000)
            for group in {*GROUPS.values(), "settings"}:
                expect(page.get_by_text(group, exact=True).first).to_be_visible(timeout=60_000)

            # The first visit may show the community dialog (nux disabled above, but to be safe).
            skip = page.get_by_role("button", name="Skip")
            if skip.count():
                skip.click()

            # The global graph shows groups collapsed: expand them all (⌥E, "Expand all groups").
            node = page.get_by_text("trained_adapter", exact=True).first
            for _ in range(3):
                if node.is_visible():
                    break
                page.keyboard.press("Alt+KeyE")
                try:
                    node.wait_for(state="visible", timeout=10_000)
                except PlaywrightTimeoutError:
                    continue
            for name in ASSETS:
                expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=30_000)
            # Full nodes (not the zoomed-out labels): each shows its partition count, the settings' too.
            expect(page.get_by_text(f"{len(webserver.partitions)} partitions", exact=True)).to_have_count(
                len(ASSETS) + len(SETTINGS) + len(ON_DEMAND_ASSETS), timeout=30_000
            )
            _wait_stable(node)
            page.screenshot(path=str(screenshot), full_page=True)
            body = page.inner_text("body")
        finally:
            browser.close()

    print(f"asset graph screenshot: {screenshot}")
    assert screenshot.exists()
    assert screenshot.stat().st_size > 20_000, f"{screenshot} is only {screenshot.stat().st_size} bytes"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ASSETS:
        assert name in body, f"{name} not on the asset graph page"
    assert "Something went wrong" not in body and "Error" not in body.split(), body[:2000]
    assert not page_errors, page_errors
