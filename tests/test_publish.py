"""Publishing the champion to the Hugging Face Hub: the on-demand published_model stage, checked on the side of a
fake Hub server on 127.0.0.1 (tests/fake_hub.py) that huggingface_hub really talks to."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from fake_hub import FakeHub
from lora_pipeline.errors import ConfigError, PublishError

TOKEN = "hf_fake_write_token"
ADAPTER_CARD = ("---\nlibrary_name: peft\nbase_model: /somewhere/local/quantized_base\n---\n"
                "# adapter\n\n## Lineage\n\n- v\n")


def _artifact(storage, key: str, asset: str, files: dict[str, bytes]):
    with storage.staging_dir() as staging:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        return storage.publish(staging, key, asset)


def _entry(ref) -> dict:
    from lora_pipeline.assets.champion import artifact_version

    return {"uri": ref.uri, "sha256": ref.sha256, "version": artifact_version(ref)}


def _champion(storage, key: str = "micro", promoted: bool = True) -> dict:
    """A candidate as the champion stage leaves it in the store (adapter, merged model, decision, card, history),
    made by hand: seconds instead of a training."""
    from safetensors.numpy import save

    from lora_pipeline.resources.records import ChampionHistory

    weights = save({"base_model.model.layers.0.q_proj.lora_A.weight": np.arange(32, dtype=np.float32).reshape(4, 8)})
    adapter = _artifact(storage, key, "trained_adapter", {
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode(),
        "adapter_model.safetensors": weights,
        "tokenizer.json": b'{"version": "1.0"}',
        "README.md": ADAPTER_CARD.encode(),
        "LINEAGE.json": b'{"version": "abc"}',
    })
    merged = _artifact(storage, key, "merged_model", {"config.json": b"{}", "model.safetensors": weights,
                                                      "README.md": b"# merged\n", "LINEAGE.json": b"{}"})
    candidate = {"trained_adapter": _entry(adapter), "merged_model": _entry(merged)}
    version = candidate["trained_adapter"]["version"]
    gates = {"better_than_base": {"passed": promoted, "detail": "loss -60%" if promoted else "not better"}}
    decision = {"promoted": promoted, "version": version if promoted else None, "candidate": version, "model": key,
                "gates": gates, "candidate_artifacts": candidate, "suite": "s", "serving": {"mode": "adapter"}}
    files = {"CHAMPION.json": json.dumps(decision).encode()}
    if promoted:
        files["README.md"] = (ADAPTER_CARD + "## Promotion\n\nevery gate passed\n").encode()
        ChampionHistory(storage, key).append("promote", version, candidate, "s", gates, None, key)
    _artifact(storage, key, "champion", files)
    return {"adapter": storage.local_path(adapter), "merged": storage.local_path(merged), "version": version}


def _publish(resources, publisher, partition: str = "micro") -> dg.ExecuteInProcessResult:
    from lora_pipeline.assets import published_model
    from lora_pipeline.assets.common import ARTIFACT_IO, MODEL_PARTITIONS

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [partition])
    # The champion as the store has it: read through the artifact IO manager, not made again.
    champion = dg.AssetSpec("champion", partitions_def=MODEL_PARTITIONS).with_io_manager_key(ARTIFACT_IO)
    # Selected on its own, as the UI's "Materialize" on the asset or the publish job does.
    return dg.materialize([champion, published_model], selection=[published_model], partition_key=partition,
                          instance=instance, resources={**resources, "publisher": publisher})


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the publisher talks to a Hub: the fake one
    with FakeHub(TOKEN) as server:
        yield server


def test_the_champion_adapter_and_its_card_arrive_on_the_hub(hub, write_config, fake_resources):
    from lora_pipeline.resources.publishing import HubPublisher

    write_config("micro", publish={"repo_id": "acme/micro-adapter", "revision": "v1", "commit_message": "first one"})
    made = _champion(fake_resources["storage"])
    result = _publish(fake_resources, HubPublisher(token=TOKEN, endpoint=hub.url))

    repo = hub.repos["acme/micro-adapter"]
    assert repo.private  # the default
    [commit] = hub.commits("acme/micro-adapter")
    assert (commit.revision, commit.summary) == ("v1", "first one")
    assert sorted(commit.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert commit.files[name] == (made["adapter"] / name).read_bytes(), name
    card = commit.files["README.md"].decode()
    assert "## Promotion" in card and "## Loading it from the Hub" in card  # the champion's card, for the Hub
    assert "base_model" not in card.split("\n---\n", 1)[0]  # a local base: the Hub refuses it in the metadata
    assert "revision='v1'" in card and "merged/" not in card
    assert ("POST", "/api/models/acme/micro-adapter/branch/v1") in hub.calls  # the Hub commits to existing branches

    metadata = result.asset_materializations_for_node("published_model")[0].metadata
    assert metadata["commit_url"].value == f"{hub.url}/acme/micro-adapter/commit/{commit.oid}"
    assert metadata["repo_url"].value == f"{hub.url}/acme/micro-adapter"
    assert metadata["revision"].value == "v1" and metadata["champion_version"].value == made["version"]
    assert metadata["uploaded_files"].value == sorted(commit.files)
    record = json.loads((Path(metadata["uri"].value) / "PUBLISHED.json").read_text())
    assert record["commit_oid"] == commit.oid and record["repo_id"] == "acme/micro-adapter"


def test_with_include_merged_the_merged_model_goes_to_merged_and_the_repo_is_reused(hub, write_config, fake_resources):
    from lora_pipeline.resources.publishing import HubPublisher

    made = _champion(fake_resources["storage"])
    publisher = HubPublisher(token=TOKEN, endpoint=hub.url)
    write_config("micro", publish={"repo_id": "acme/micro", "private": False})
    _publish(fake_resources, publisher)
    write_config("micro", publish={"repo_id": "acme/micro", "include_merged": True})
    _publish(fake_resources, publisher)

    first, second = hub.commits("acme/micro")
    assert not hub.repos["acme/micro"].private  # created public; the second publish finds it (409) and goes on
    assert first.summary == f"lora-pipeline: champion {made['version']} of micro" and first.revision == "main"
    assert "merged/model.safetensors" not in first.files
    assert second.files["merged/model.safetensors"] == (made["merged"] / "model.safetensors").read_bytes()
    assert second.files["merged/README.md"] == b"# merged\n" and "merged/LINEAGE.json" not in second.files
    assert "subfolder='merged'" in second.files["README.md"].decode()


def test_refusals_say_what_is_missing(hub, write_config, fake_resources):
    from lora_pipeline.resources.publishing import HubPublisher

    _champion(fake_resources["storage"])
    write_config("micro")  # no publish.repo_id
    with pytest.raises(ConfigError, match=r"publish\.repo_id is not set"):
        _publish(fake_resources, HubPublisher(token=TOKEN, endpoint=hub.url))
    write_config("micro", publish={"repo_id": "acme/micro"})
    with pytest.raises(PublishError, match="HF_TOKEN is not set"):
        _publish(fake_resources, HubPublisher(endpoint=hub.url))
    with pytest.raises(PublishError, match="the Hub refused publishing to acme/micro: .*401"):
        _publish(fake_resources, HubPublisher(token="hf_wrong", endpoint=hub.url))
    assert hub.repos == {}


def test_a_candidate_the_champion_stage_refused_is_not_published(hub, write_config, fake_resources):
    from lora_pipeline.resources.publishing import HubPublisher

    _champion(fake_resources["storage"], promoted=False)
    write_config("micro", publish={"repo_id": "acme/micro"})
    refused = r"refused candidate \w+ \(failed: better_than_base\), so nothing is published"
    with pytest.raises(PublishError, match=refused):
        _publish(fake_resources, HubPublisher(token=TOKEN, endpoint=hub.url))
    assert hub.calls == []


def test_the_folder_publisher_stands_in_for_the_hub(write_config, fake_resources, tmp_path):
    from lora_pipeline.resources.publishing import FolderPublisher

    made = _champion(fake_resources["storage"])
    write_config("micro", publish={"repo_id": "acme/micro", "include_merged": True})
    result = _publish(fake_resources, FolderPublisher(root=str(tmp_path / "hub")))
    log = json.loads((tmp_path / "hub" / "acme" / "micro" / "log.json").read_text())
    [commit] = log["commits"]
    assert log["private"] and commit["revision"] == "main" and "merged/model.safetensors" in commit["files"]
    folder = tmp_path / "hub" / "acme" / "micro" / "commits" / commit["oid"]
    name = "adapter_model.safetensors"
    assert (folder / name).read_bytes() == (made["adapter"] / name).read_bytes()
    metadata = result.asset_materializations_for_node("published_model")[0].metadata
    assert metadata["commit_url"].value == folder.as_uri()


def test_the_hub_card_names_a_hub_base_in_its_metadata_and_no_other():
    from lora_pipeline.ml.report.modelcard import hub_card, is_hub_id

    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("gpt2")
    assert not any(is_hub_id(name) for name in ("builtin:tiny-llama", "/models/base", "./base", "s3://b/base"))
    card = hub_card(ADAPTER_CARD, "meta-llama/Llama-3.1-8B", "acme/m", "main", None)
    front, body = card.split("\n---\n", 1)
    assert "base_model: meta-llama/Llama-3.1-8B" in front and "library_name: peft" in front
    assert "AutoPeftModelForCausalLM.from_pretrained('acme/m')" in body
    assert body.index("## Loading it from the Hub") < body.index("## Lineage")


def test_publishing_is_on_demand_only():
    from lora_pipeline.cli.selection import selected_asset_names, selection
    from lora_pipeline.definitions import defs
    from lora_pipeline.sensors import stage_names

    def keys(job: str) -> set[str]:
        return {key.to_user_string() for key in defs.resolve_job_def(job).asset_layer.executable_asset_keys}

    assert "published_model" not in keys("tune") and keys("publish") == {"published_model"}
    assert "published_model" not in stage_names()  # so no sensor, schedule or `list` staleness runs it
    for text in ("*", "champion+", "key:eval_report+"):
        assert "published_model" not in selected_asset_names(selection(text)), text
    assert selected_asset_names(selection("published_model")) == ["published_model"]
    assert selected_asset_names(selection("+published_model"))[-2:] == ["champion", "published_model"]
    graph = defs.resolve_assets_def("published_model")
    assert graph.asset_deps[graph.key] == {dg.AssetKey("champion")}


def test_the_deployment_takes_the_token_from_hf_token(monkeypatch):
    from lora_pipeline.resources.factory import default_resources

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert default_resources()["publisher"].token is None
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    publisher = default_resources()["publisher"]
    assert publisher.token == dg.EnvVar("HF_TOKEN") and publisher.endpoint == dg.EnvVar("HF_ENDPOINT")


@pytest.mark.slow
def test_cli_trains_offline_then_publishes_the_champion_when_asked(hub, tmp_path, write_config, monkeypatch):
    from test_cli import _cli

    monkeypatch.delenv("HF_TOKEN", raising=False)
    path = write_config("micro", quantization={"mode": "none"},
                        publish={"repo_id": "acme/micro", "include_merged": True, "revision": "trained"})
    offline = {"HF_HUB_OFFLINE": "1"}
    trained = json.loads(_cli(["run", str(path), "--json"], tmp_path, check_rc=0, env=offline).stdout.splitlines()[-1])
    assert trained["champion"]["promoted"] and "published_model" not in trained["assets"]  # never automatic
    assert hub.calls == []

    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url}
    missing = _cli(["run", str(path), "--select", "published_model"], tmp_path, check_rc=2, env=online)
    assert "HF_TOKEN is not set" in missing.stderr
    no_repo = _cli(["run", str(path), "--select", "published_model", "--set", "publish.repo_id=null"], tmp_path,
                   check_rc=2, env={**online, "HF_TOKEN": TOKEN})
    assert "publish.repo_id is not set" in no_repo.stderr

    done = _cli(["run", str(path), "--select", "published_model", "--json"], tmp_path, check_rc=0,
                env={**online, "HF_TOKEN": TOKEN})
    published = json.loads(done.stdout.splitlines()[-1])["assets"]["published_model"]["metadata"]
    [commit] = hub.commits("acme/micro")
    assert published["commit_url"] == f"{hub.url}/acme/micro/commit/{commit.oid}" and commit.revision == "trained"
    assert f"published: {published['commit_url']}" in done.stderr
    adapter = Path(trained["assets"]["trained_adapter"]["uri"])
    merged = Path(trained["assets"]["merged_model"]["uri"])
    assert commit.files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert commit.files["adapter_config.json"] == (adapter / "adapter_config.json").read_bytes()
    assert commit.files["merged/model.safetensors"] == (merged / "model.safetensors").read_bytes()
    card = commit.files["README.md"].decode()
    champion_card = (Path(trained["assets"]["champion"]["uri"]) / "README.md").read_text()
    assert "## Evaluation" in card and "## Promotion" in card and card.startswith("---\n")
    assert champion_card.split("## Lineage")[0].split("\n---\n", 1)[1] in card  # the champion's card, extended
    assert hub.repos["acme/micro"].private and not any(name.endswith("LINEAGE.json") for name in commit.files)
