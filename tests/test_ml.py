"""ML building blocks on the micro model: tokens and labels, quantization, the dequantize trap, merging."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_pipeline.ml.batches import IGNORE_INDEX, example_batches, logits_of, max_relative_difference, pad_id_of
from lora_pipeline.ml.base.loading import StaleQuantStateError, assert_dequantizable, load_dequantized, load_full_precision
from lora_pipeline.ml.merge import merge_adapter
from lora_pipeline.ml.base.precision import DeviceInfo
from lora_pipeline.ml.base.quantize import quantize_base

from conftest import dataset_settings, format_rows, sample_corpus

CPU = DeviceInfo(device="cpu")


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_base)


@pytest.fixture(scope="module")
def splits(tokenizer):
    formatted = format_rows(tokenizer, dataset_settings(max_rows=160), eval_fraction=0.15, max_length=96)
    return SimpleNamespace(train=formatted.train.to_pandas(), eval=formatted.eval.to_pandas())


@pytest.fixture(scope="module")
def nf4_dir(micro_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4")
    quantize_base(micro_base, out, "nf4", True, "float32", CPU)
    return out


def test_builtin_tokenizer_pads_with_a_token_that_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_builtin_model_is_deterministic(micro_base, tmp_path):
    from lora_pipeline.ml.base.tiny import BUILTIN_MODELS, build_tiny_llama

    again = build_tiny_llama(sample_corpus(), tmp_path / "again", BUILTIN_MODELS["micro-llama"])
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (micro_base / name).read_bytes()


def test_eval_labels_mask_the_prompt_and_keep_eos(tokenizer, splits):
    batch = example_batches(splits.eval.head(4), pad_id_of(tokenizer), batch_size=4)[0]
    for row, (prompt_tokens, tokens) in enumerate(zip(splits.eval["prompt_tokens"][:4], splits.eval["tokens"][:4])):
        length = int(batch.attention_mask[row].sum())
        labels = batch.labels[row]
        assert length == tokens
        assert (labels[:prompt_tokens] == IGNORE_INDEX).all()
        assert (labels[prompt_tokens:length] == batch.input_ids[row, prompt_tokens:length]).all()
        assert int(labels[length - 1]) == tokenizer.eos_token_id
        assert (labels[length:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("pad", ["distinct", "eos"])
def test_trl_training_batches_keep_eos_in_the_labels_and_mask_prompt_and_padding(micro_base, splits, tmp_path, pad):
    """The anchors' "never stops" bug: pad == EOS with a collator that masks pad drops EOS from the labels.

    Our labels come from the loss mask, so EOS keeps its label even when a tokenizer pads with EOS.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lora_pipeline.ml.training import training_labels

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    if pad == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    head = splits.train.head(3)
    args = SFTConfig(output_dir=str(tmp_path), max_length=96, use_cpu=True, report_to=[], per_device_train_batch_size=3)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(micro_base),
        args=args,
        train_dataset=Dataset.from_dict(
            {"input_ids": [list(map(int, ids)) for ids in head["input_ids"]], "labels": training_labels(head)}
        ),
        processing_class=tokenizer,
    )
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        assert example["input_ids"][-1] == tokenizer.eos_token_id
        assert example["input_ids"].count(tokenizer.eos_token_id) == 1
        assert int(batch["labels"][row, length - 1]) == tokenizer.eos_token_id
        assert int(batch["labels"][row, 0]) == IGNORE_INDEX
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()


def test_nf4_quantization_is_saved_and_reloads_exactly(micro_base, nf4_dir):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from lora_pipeline.ml.base.quantize import bitsandbytes_config

    reloaded = AutoModelForCausalLM.from_pretrained(nf4_dir, device_map={"": "cpu"})
    in_memory = AutoModelForCausalLM.from_pretrained(
        micro_base, quantization_config=bitsandbytes_config("nf4", True, "float32"), device_map={"": "cpu"}
    )
    assert reloaded.config.quantization_config.bnb_4bit_quant_type == "nf4"
    for name in ("q_proj", "o_proj"):
        a = getattr(reloaded.model.layers[1].self_attn, name).weight
        b = getattr(in_memory.model.layers[1].self_attn, name).weight
        assert type(a).__name__ == "Params4bit"
        assert torch.equal(bnb.functional.dequantize_4bit(a.data, a.quant_state), bnb.functional.dequantize_4bit(b.data, b.quant_state))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_dequantizing_a_fresh_reload_is_accurate(micro_base, nf4_dir):
    original = load_full_precision(micro_base).model.layers[0].self_attn.q_proj.weight
    dequantized = load_dequantized(nf4_dir).model.layers[0].self_attn.q_proj.weight
    assert _relative_error(dequantized, original) < 0.15  # NF4's usual error is about 0.09


def test_dequantizing_after_a_cpu_forward_pass_is_refused(micro_base, nf4_dir):
    """bitsandbytes 0.50 re-lays out 4-bit weights on the first CPU forward; dequantizing then is wrong."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nf4_dir, device_map={"": "cpu"})
    assert_dequantizable(model)
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 12]]))
    layer = model.model.layers[0].self_attn.q_proj
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes build does not re-lay out 4-bit weights on the CPU")
    original = load_full_precision(micro_base).model.layers[0].self_attn.q_proj.weight
    wrong = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert _relative_error(wrong, original) > 0.5  # the trap is real: guard against it
    with pytest.raises(StaleQuantStateError, match="reload the quantized model"):
        assert_dequantizable(model)


def _random_adapter(base_dir, out_dir):
    """An adapter with non-zero B matrices, so merging it changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(
        load_full_precision(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("weights", ["dequantized", "original"])
def test_merged_logits_equal_the_adapter_on_the_same_weights(micro_base, nf4_dir, tokenizer, splits, tmp_path, weights):
    adapter_dir = _random_adapter(micro_base, tmp_path / "adapter")
    probes = example_batches(splits.eval.head(6), pad_id_of(tokenizer), batch_size=3)
    base = load_dequantized(nf4_dir) if weights == "dequantized" else load_full_precision(micro_base)
    base_logits = logits_of(base, probes)
    merged, fidelity = merge_adapter(base, adapter_dir, probes)
    assert fidelity.max_relative_logit_difference < 1e-4
    # the adapter really changed the model, so the comparison above is not vacuous
    assert max_relative_difference(base_logits, logits_of(merged, probes)) > 1e-3
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_4bit_on_cpu_refuses_layer_widths_the_kernel_cannot_run(micro_base, tmp_path):
    """bitsandbytes 0.50 crashes in the CPU forward of a 4-bit layer whose width is not a multiple of 64."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.errors import ModelError

    config = AutoConfig.from_pretrained(micro_base)
    config.intermediate_size = 160
    odd = tmp_path / "odd"
    AutoModelForCausalLM.from_config(config).save_pretrained(odd)
    AutoTokenizer.from_pretrained(micro_base).save_pretrained(odd)
    with pytest.raises(ModelError, match=r"down_proj has 160 input features"):
        quantize_base(odd, tmp_path / "out", "nf4", True, "float32", CPU)
    assert quantize_base(odd, tmp_path / "int8", "int8", True, "float32", CPU).quantized_modules == 14


def test_a_nan_loss_stops_training_with_the_step_and_saves_nothing(micro_base, splits, tmp_path):
    from lora_pipeline.config.schema import LoraSettings, TrainingSettings
    from lora_pipeline.ml.training import TrainingDivergedError, train_adapter

    diverging = TrainingSettings(max_steps=6, batch_size=8, learning_rate=1e30, max_grad_norm=1e30, warmup=0.0)
    with pytest.raises(TrainingDivergedError, match=r"the training loss is (nan|inf|-inf) at step \d+"):
        train_adapter(micro_base, splits.train, tmp_path / "out", LoraSettings(r=8, alpha=16, dropout=0.0),
                      diverging, CPU, "micro")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_training_resumed_from_a_checkpoint_ends_with_the_same_adapter_bit_for_bit(micro_base, splits, tmp_path):
    """Optimizer, scheduler, RNG and data position all come back: the resumed run is the uninterrupted one.

    On an unquantized base; with bitsandbytes' CPU 4-bit layers a resumed run drifts by about 1e-4 in
    the loss (see the issue-4 note), so QLoRA resumes are checked for step counts, not bits.
    """
    import shutil

    from safetensors.torch import load_file

    from lora_pipeline.config.schema import LoraSettings, TrainingSettings
    from lora_pipeline.ml.training import train_adapter

    lora = LoraSettings(r=8, alpha=16, dropout=0.1)  # dropout draws from the RNG, which must be restored too
    settings = TrainingSettings(max_steps=8, batch_size=4, learning_rate=3e-3, max_length=96, warmup=0.25,
                                checkpoint_every=4, logging_steps=1)
    kept = tmp_path / "step-4"

    def keep_step_4(folder, step):
        if step == 4:
            shutil.copytree(folder, kept)

    whole = train_adapter(micro_base, splits.train, tmp_path / "whole", lora, settings, CPU, "micro",
                          on_checkpoint=keep_step_4)
    resumed = train_adapter(micro_base, splits.train, tmp_path / "resumed", lora, settings, CPU, "micro",
                            resume_from=kept)
    assert (whole.steps, resumed.steps, resumed.resumed_from_step) == (8, 8, 4)
    assert resumed.loss_history[-1] == whole.loss_history[-1]
    weights = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert weights.keys() == again.keys() and all(weights[name].equal(again[name]) for name in weights)


def test_trainable_parameters_train_in_the_resolved_dtype(micro_base):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_pipeline.ml.training.trainer import _keep_trainable_dtype

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base),
                           LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    for parameter in model.parameters():  # what TRL's SFTTrainer does to a quantized model's adapters
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)
    assert _keep_trainable_dtype(model, "fp32") == "float32"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert _keep_trainable_dtype(model, "bf16") == "bfloat16"
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert all(dtype == (torch.float32 if "magnitude" in name else torch.bfloat16) for name, dtype in dtypes.items())
    assert any(p.dtype == torch.float32 for p in model.parameters() if not p.requires_grad)  # the base untouched
