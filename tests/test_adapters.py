"""Several adapters on one base (ml/adapters.py): each answers as it does alone, the bare base answers as the
base, and blends refuse what PEFT 0.21.2 would get wrong without a word. A tiny random Llama on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tiny_base, tmp_path_factory):
    """Adapters saved to folders: name -> path. Their lora_B (and any trained module) is perturbed, so each
    adapter changes the logits, as a trained one does."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapters")

    def save(name: str, seed: int, **settings) -> Path:
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(tiny_base),
                               LoraConfig(target_modules=["q_proj", "v_proj"], **{"r": 4, "lora_alpha": 8, **settings}))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name or "modules_to_save" in parameter_name:
                    parameter.add_(torch.randn_like(parameter) * 0.5)
        model.save_pretrained(folder / name)
        return folder / name

    return {
        "one": save("one", 1),
        "two": save("two", 2),
        "wide": save("wide", 3, r=8),
        "rs": save("rs", 4, use_rslora=True),
        "dora": save("dora", 5, use_dora=True),
        "head": save("head", 6, modules_to_save=["lm_head"]),
    }


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _alone(tiny_base, path: Path, input_ids):
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(copy.deepcopy(tiny_base), str(path)).eval(), input_ids)


def _attached(tiny_base, saved, names):
    from lora_pipeline.ml.adapters import attach_adapters

    return attach_adapters(copy.deepcopy(tiny_base), {name: saved[name] for name in names}).eval()


def test_each_adapter_on_one_base_answers_as_alone_and_none_is_the_bare_base(tiny_base, saved, input_ids):
    from lora_pipeline.ml.adapters import using

    model = _attached(tiny_base, saved, ["one", "two"])
    bare = _logits(tiny_base, input_ids)
    for name in ("one", "two", "one"):  # switching back and forth changes nothing
        with using(model, name):
            got = _logits(model, input_ids)
        assert torch.allclose(got, _alone(tiny_base, saved[name], input_ids), atol=1e-5)
        assert not torch.allclose(got, bare, atol=1e-3)
    with using(model, None):
        assert torch.allclose(_logits(model, input_ids), bare, atol=1e-5)
    with using(model, "two"):
        pass
    assert model.active_adapter == "one"  # the adapter active before the block is active again after it


def test_attach_refuses_empty_and_reused_names(tiny_base, saved):
    from lora_pipeline.ml.adapters import attach_adapters

    with pytest.raises(ValueError, match="non-empty"):
        attach_adapters(copy.deepcopy(tiny_base), {"": saved["one"]})
    model = attach_adapters(copy.deepcopy(tiny_base), {"one": saved["one"]})
    with pytest.raises(ValueError, match="'one' is already attached"):
        attach_adapters(model, {"one": saved["two"]})
    assert set(attach_adapters(model, {"two": saved["two"]}).peft_config) == {"one", "two"}


def test_a_linear_blend_weighted_one_zero_answers_as_its_first_adapter(tiny_base, saved, input_ids):
    from lora_pipeline.ml.adapters import Blend, add_blend, using

    model = _attached(tiny_base, saved, ["one", "two"])
    name = add_blend(model, Blend("mostly-one", ("one", "two"), (1.0, 0.0)))
    with using(model, name):
        blended = _logits(model, input_ids)
    assert torch.allclose(blended, _alone(tiny_base, saved["one"], input_ids), atol=1e-5)
    assert not torch.allclose(blended, _logits(tiny_base, input_ids), atol=1e-3)

    add_blend(model, Blend("half-half", ("one", "two"), (0.5, 0.5), combination="cat"))
    with using(model, "half-half"):
        half = _logits(model, input_ids)
    # cat is exact: half of each adapter's delta, so neither adapter alone and not the base.
    assert not torch.allclose(half, blended, atol=1e-3)
    assert not torch.allclose(half, _logits(tiny_base, input_ids), atol=1e-3)


def test_a_reused_blend_name_is_refused(tiny_base, saved, input_ids):
    from lora_pipeline.ml.adapters import Blend, add_blend, using

    model = _attached(tiny_base, saved, ["one", "two"])
    add_blend(model, Blend("mix", ("one", "two"), (1.0, 0.0)))
    for name in ("mix", "two"):
        with pytest.raises(ValueError, match=f"blend '{name}': an adapter of that name is already attached"):
            add_blend(model, Blend(name, ("one", "two"), (0.0, 1.0)))
    with using(model, "mix"):  # unchanged: still the first recipe
        assert torch.allclose(_logits(model, input_ids), _alone(tiny_base, saved["one"], input_ids), atol=1e-5)


def test_unequal_ranks_are_refused_for_linear_and_allowed_for_cat_and_svd(tiny_base, saved, input_ids):
    from lora_pipeline.ml.adapters import Blend, add_blend, using

    model = _attached(tiny_base, saved, ["one", "wide"])
    for combination in ("linear", "ties", "dare_linear"):
        with pytest.raises(ValueError, match=r"needs equal ranks \(one r=4, wide r=8\)"):
            add_blend(model, Blend("mix", ("one", "wide"), (1.0, 1.0), combination, density=0.5
                                   if combination != "linear" else None))
    add_blend(model, Blend("cat", ("one", "wide"), (0.0, 1.0), "cat"))
    add_blend(model, Blend("svd", ("one", "wide"), (0.0, 1.0), "svd"))
    wide = _alone(tiny_base, saved["wide"], input_ids)
    for name in ("cat", "svd"):  # both exact here (svd keeps rank 8, the delta's full rank)
        with using(model, name):
            assert torch.allclose(_logits(model, input_ids), wide, atol=1e-4)


@pytest.mark.parametrize("adapter, message", [
    ("rs", "uses rsLoRA, which PEFT 0.21's add_weighted_adapter blends wrong"),
    ("dora", "uses DoRA"),
    ("head", "trains modules in full"),
])
def test_adapters_peft_would_blend_wrong_are_refused(tiny_base, saved, adapter, message):
    from lora_pipeline.ml.adapters import Blend, add_blend

    model = _attached(tiny_base, saved, ["one", adapter])
    for combination in ("linear", "cat", "svd"):
        with pytest.raises(ValueError, match=message):
            add_blend(model, Blend("mix", ("one", adapter), (0.5, 0.5), combination))
    assert "mix" not in model.peft_config


def test_what_peft_does_with_an_rslora_blend_is_what_the_guard_says(tiny_base, saved, input_ids):
    """The guard's reason, checked on the pinned PEFT: the blend keeps use_rslora with lora_alpha=r, so it is
    scaled by sqrt(r). If a PEFT upgrade fixes it, this test fails and the guard can go."""
    model = _attached(tiny_base, saved, ["rs"])
    model.add_weighted_adapter(["rs"], [1.0], "raw", combination_type="linear")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["raw"] == pytest.approx(4 ** 0.5)
    model.set_adapter("raw")
    assert not torch.allclose(_logits(model, input_ids), _alone(tiny_base, saved["rs"], input_ids), atol=1e-3)


@pytest.mark.parametrize("blend, message", [
    (dict(adapters=("one", "nope"), weights=(1.0, 1.0)), "unknown adapter 'nope'"),
    (dict(adapters=("one", "two"), weights=(1.0,)), "1 weights for 2 adapters"),
    (dict(adapters=("one", "two"), weights=(1.0, float("nan"))), "finite numbers"),
    (dict(adapters=("one", "one"), weights=(1.0, 1.0)), "lists an adapter twice"),
    (dict(adapters=("one", "two"), weights=(1.0, 1.0), combination="average"), "'average' is not supported"),
    (dict(adapters=("one", "two"), weights=(1.0, 1.0), combination="ties"), "'ties' needs a density"),
    (dict(adapters=("one", "two"), weights=(1.0, 1.0), combination="dare_ties", density=1.5), r"density must be in \(0, 1\]"),
    (dict(adapters=("one", "two"), weights=(1.0, 1.0), density=0.5), "density applies to"),
    (dict(adapters=(), weights=()), "names no adapter"),
])
def test_bad_blends_are_refused_with_a_clear_message(tiny_base, saved, blend, message):
    from lora_pipeline.ml.adapters import Blend, add_blend

    model = _attached(tiny_base, saved, ["one", "two"])
    with pytest.raises(ValueError, match=message):
        add_blend(model, Blend(name="mix", **blend))
    assert "mix" not in model.peft_config


def test_ties_and_dare_blends_of_equal_ranks_are_added(tiny_base, saved, input_ids):
    from lora_pipeline.ml.adapters import Blend, add_blend, using

    model = _attached(tiny_base, saved, ["one", "two"])
    for combination in ("ties", "dare_ties", "dare_linear", "magnitude_prune", "ties_svd"):
        name = add_blend(model, Blend(combination, ("one", "two"), (0.7, 0.3), combination, density=0.5))
        with using(model, name):
            assert torch.isfinite(_logits(model, input_ids)).all()


def test_a_name_torch_dicts_use_for_themselves_gets_a_peft_name_of_its_own(tiny_base, saved, input_ids):
    from lora_pipeline.ml.adapters import Blend, adapter_name, add_blend, attach_adapters, using

    assert adapter_name("tiny-sweep.r4") == "tiny-sweep_r4" and adapter_name("mix") == "mix"
    assert [adapter_name(key) for key in ("half", "eval", "train", "keys")] == ["half_", "eval_", "train_", "keys_"]
    # torch refuses 'train' and 'half' as module dict keys: "attribute 'half' already exists".
    model = attach_adapters(copy.deepcopy(tiny_base), {"one": saved["one"], adapter_name("train"): saved["two"]})
    name = add_blend(model, Blend(adapter_name("half"), ("one", "train_"), (1.0, 0.0), "cat"))
    with using(model, name):
        assert torch.isfinite(_logits(model, input_ids)).all()
