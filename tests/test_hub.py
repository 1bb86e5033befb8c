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
    with pytest.raises(ModelError, match="no safetensors weights"):  # a repo with only pickles downloads none
        hub.resolve("acme/model", None, _never_called)
    (tmp_path / "model.safetensors").write_bytes(b"")
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


def test_a_model_with_only_pickle_weights_is_refused_unless_allowed(micro_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.errors import ModelError
    from lora_pipeline.resources import LocalModelHub

    import shutil

    import torch

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(micro_base).state_dict(), pickled / "pytorch_model.bin")
    shutil.copy(micro_base / "config.json", pickled / "config.json")
    AutoTokenizer.from_pretrained(micro_base).save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").exists() and not list(pickled.glob("*.safetensors"))
    hub = LocalModelHub(cache_dir=str(tmp_path / "cache"), models={"acme/pickled": str(pickled)})
    for name in (str(pickled), "acme/pickled"):
        with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
            hub.resolve(name, None, lambda: [])
        assert hub.resolve(name, None, lambda: [], allow_pickle=True) == pickled.resolve()
        assert hub.resolve(name, None, lambda: [], tokenizer_only=True) == pickled.resolve()  # tokenizers are not pickles


def test_allow_pickle_is_a_config_key_that_defaults_to_off(write_config):
    from lora_pipeline.config.registry import load_config_file

    assert load_config_file(write_config("micro"), []).allow_pickle is False
    assert load_config_file(write_config("micro"), ["allow_pickle=true"]).allow_pickle is True


def _model_with_its_own_code(micro_base, folder):
    """The micro model re-badged as an architecture whose classes live in .py files beside the weights."""
    import json
    import shutil

    shutil.copytree(micro_base, folder)
    (folder / "configuration_acme.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass AcmeConfig(LlamaConfig):\n    model_type = 'acme_llama'\n"
    )
    (folder / "modeling_acme.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_acme import AcmeConfig\n\n\n"
        "class AcmeForCausalLM(LlamaForCausalLM):\n    config_class = AcmeConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="acme_llama",
        architectures=["AcmeForCausalLM"],
        auto_map={"AutoConfig": "configuration_acme.AcmeConfig", "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_that_ships_code_is_refused_before_loading_unless_trusted(micro_base, tmp_path):
    from lora_pipeline.resources import LocalModelHub

    custom = _model_with_its_own_code(micro_base, tmp_path / "custom")
    hub = LocalModelHub(cache_dir=str(tmp_path / "cache"), models={"acme/custom": str(custom)})
    for name in (str(custom), "acme/custom"):
        for tokenizer_only in (True, False):  # the data stage, which runs first, refuses it already
            with pytest.raises(ModelError, match=r"config.json has an auto_map \(configuration_acme.AcmeConfig, "
                               r"modeling_acme.AcmeForCausalLM\).*trust_remote_code: true"):
                hub.resolve(name, None, _never_called, tokenizer_only=tokenizer_only)
        assert hub.resolve(name, None, _never_called, trust_remote_code=True) == custom.resolve()


def test_hub_downloads_python_files_only_when_code_is_trusted(monkeypatch, tmp_path):
    import huggingface_hub

    patterns = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download",
        lambda repo_id, revision, allow_patterns: patterns.append(allow_patterns) or str(tmp_path),
    )
    (tmp_path / "model.safetensors").write_bytes(b"")
    hub = ModelHub(cache_dir=str(tmp_path / "cache"))
    hub.resolve("acme/model", None, _never_called)
    hub.resolve("acme/model", None, _never_called, trust_remote_code=True)
    assert "*.py" not in patterns[0] and "*.py" in patterns[1]


def test_a_trusted_model_with_its_own_code_runs_through_the_whole_graph(micro_base, tmp_path, write_config,
                                                                      fake_resources):
    import json

    import dagster as dg

    from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
    from lora_pipeline.assets.common import MODEL_PARTITIONS
    from lora_pipeline.resources import LocalModelHub

    custom = _model_with_its_own_code(micro_base, tmp_path / "custom")
    fake_resources["hub"] = LocalModelHub(cache_dir=str(tmp_path / "models"), models={"acme/custom": str(custom)})
    write_config("custom", base_model="acme/custom", trust_remote_code=True)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["custom"])
    result = dg.materialize([*PIPELINE_ASSETS, *PIPELINE_CHECKS], partition_key="custom", instance=instance,
                            resources=fake_resources)
    assert result.success
    merged = fake_resources["storage"].local_path(fake_resources["storage"].current("custom", "merged_model"))
    assert json.loads((merged / "config.json").read_text())["model_type"] == "acme_llama"
    assert (merged / "modeling_acme.py").exists()  # the code travels with the model that needs it


def _tokenizer_facts(tokenizer) -> dict:
    """What formatting reads from a tokenizer: its class, its whole Rust tokenizer, its special tokens and template."""
    return {
        "class": type(tokenizer).__name__,
        "backend": tokenizer.backend_tokenizer.to_str(),
        "special": tokenizer.special_tokens_map,
        "ids": (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id),
        "chat_template": tokenizer.chat_template,
        "encoded": tokenizer("### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>").input_ids,
    }


@pytest.mark.parametrize("declared", ["TokenizersBackend", "PreTrainedTokenizerFast", "LlamaTokenizer"])
def test_a_remembered_tokenizer_class_loads_what_autotokenizer_loads(micro_base, tmp_path, declared):
    """The class AutoTokenizer chose is remembered per folder and files; a later load calls it directly and
    gets the same tokenizer, whatever class the folder declares (a Llama-declared byte-level one included)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from lora_pipeline.ml.base.tokenizer import load_tokenizer

    folder = tmp_path / "base"
    shutil.copytree(micro_base, folder)
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": declared}))
    memo = tmp_path / "memo"
    expected = _tokenizer_facts(AutoTokenizer.from_pretrained(folder))
    assert _tokenizer_facts(load_tokenizer(folder, memo)) == expected  # chosen by AutoTokenizer, then remembered
    [remembered] = memo.iterdir()
    assert json.loads(remembered.read_text())["class"] == expected["class"]
    assert _tokenizer_facts(load_tokenizer(folder, memo)) == expected  # loaded with the remembered class


def test_a_tokenizer_class_is_chosen_again_when_the_files_change_or_the_memo_is_unusable(micro_base, tmp_path):
    import json
    import shutil

    from lora_pipeline.ml.base.tokenizer import load_tokenizer

    folder, memo = tmp_path / "base", tmp_path / "memo"
    shutil.copytree(micro_base, folder)
    load_tokenizer(folder, memo)
    [first] = memo.iterdir()
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    load_tokenizer(folder, memo)
    assert len(list(memo.iterdir())) == 2  # other files, another choice
    first.write_text(json.dumps({"module": "transformers.no_such_module", "class": "Gone"}))  # a newer transformers'
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "TokenizersBackend"}))
    assert type(load_tokenizer(folder, memo)).__name__ == "TokenizersBackend"


def test_loading_a_remembered_tokenizer_does_not_import_torch(micro_base, tmp_path):
    """The point of remembering: the data stages load the tokenizer without the seconds of importing torch."""
    import subprocess
    import sys

    from lora_pipeline.ml.base.tokenizer import load_tokenizer

    memo = tmp_path / "memo"
    load_tokenizer(micro_base, memo)
    script = (f"import sys; from pathlib import Path; from lora_pipeline.ml.base.tokenizer import load_tokenizer; "
              f"load_tokenizer(Path({str(micro_base)!r}), Path({str(memo)!r})); "
              "print(sorted(m for m in ('torch', 'transformers.models.llama.configuration_llama') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
