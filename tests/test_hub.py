"""ModelHub: what it downloads, and how it fails."""

from __future__ import annotations

import pytest

from lora_pipeline.errors import ModelError
from lora_pipeline.resources.hub import ModelHub


def _never_called():
    raise AssertionError("the corpus is only built for built-in models")


def test_data_stages_download_only_tokenizer_files(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    hub = ModelHub(cache_dir=str(tmp_path / "cache"))
    hub.resolve("acme/model", "v1", _never_called, tokenizer_only=True)
    hub.resolve("acme/model", None, _never_called)
    assert not any("safetensors" in p for p in calls[0][2])
    assert "*.safetensors" in calls[1][2] and calls[0][1] == "v1"
    assert not any(p.endswith((".bin", ".pt", ".pth")) for _, _, patterns in calls for p in patterns)


def test_an_unreachable_hub_id_is_a_model_error_naming_it(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(**_):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="base_model 'acme/model': not a local folder, and the hub download failed"):
        ModelHub(cache_dir=str(tmp_path)).resolve("acme/model", None, _never_called)


def test_a_local_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        ModelHub(cache_dir=str(tmp_path)).resolve(str(tmp_path / "weights"), None, _never_called)


def test_unknown_builtin_names_the_available_ones(tmp_path):
    with pytest.raises(ModelError, match="builtin:tiny-llama"):
        ModelHub(cache_dir=str(tmp_path)).resolve("builtin:giant-llama", None, lambda: ["text"])
