"""The lean training step's levers are exact (or, for dropout, keep its rate): each against the plain computation."""

from __future__ import annotations

import pytest
import torch

from lora_pipeline.ml.base.precision import DeviceInfo
from lora_pipeline.ml.batches import IGNORE_INDEX

from conftest import dataset_settings, format_rows

CPU = DeviceInfo(device="cpu")


@pytest.fixture(scope="module")
def nf4_dir(micro_base, tmp_path_factory):
    from lora_pipeline.ml.base.quantize import quantize_base

    out = tmp_path_factory.mktemp("nf4")
    quantize_base(micro_base, out, "nf4", True, "float32", CPU)
    return out


def _model(folder, dropout: float = 0.0, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def _documents(lengths=(7, 12, 5), seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (length,), generator=generator) for length in lengths]


def _padding_free_batch(documents):
    """A batch as TRL's padding-free collator makes it: one row, positions restarting, boundaries marked."""
    lengths = torch.tensor([len(d) for d in documents])
    boundaries = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    position_ids = torch.cat([torch.arange(len(d)) for d in documents]).unsqueeze(0)
    labels = torch.cat(documents).unsqueeze(0).clone()
    labels[position_ids == 0] = -100
    return {"input_ids": torch.cat(documents).unsqueeze(0), "position_ids": position_ids, "labels": labels,
            "cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries,
            "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}


def test_per_document_attention_equals_each_document_run_alone(micro_base):
    from lora_pipeline.ml.training.attention import use_per_document_attention

    model = _model(micro_base).eval()
    documents = _documents()
    with torch.no_grad():
        alone = [model(input_ids=d.unsqueeze(0)).logits[0] for d in documents]
        use_per_document_attention(model)
        batch = _padding_free_batch(documents)
        batch.pop("labels")
        packed = model(**batch).logits[0]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)
    # Without the boundaries the row would be one long document: the later documents' logits would differ.
    with torch.no_grad():
        batch = _padding_free_batch(documents)
        batch.pop("labels"), batch.pop("cu_seq_lens_q")
        crossed = model(**batch).logits[0]
    assert not torch.allclose(crossed[len(documents[0]):], torch.cat(alone[1:]), atol=1e-3)


def test_lean_loss_equals_the_models_own_loss_and_its_gradients(micro_base):
    from lora_pipeline.ml.training.step import lean_loss

    model = _model(micro_base)
    documents = _documents()
    width = max(len(d) for d in documents)
    input_ids = torch.zeros(len(documents), width, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for row, document in enumerate(documents):
        input_ids[row, : len(document)] = document
        labels[row, 2 : len(document)] = document[2:]  # a prompt of two tokens is not learned
        mask[row, : len(document)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    own = model(**batch).loss
    own.backward()
    own_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours, metrics = lean_loss(model, batch, with_metrics=True)
    ours.backward()
    assert torch.allclose(ours, own, rtol=1e-6, atol=1e-6)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(parameter.grad, own_grads[name], rtol=1e-4, atol=1e-7), name
    assert metrics["tokens"] == int((labels[:, 1:] != -100).sum())
    assert 0 <= metrics["correct"] <= metrics["tokens"] and metrics["entropy"] > 0


def test_summed_cross_entropy_equals_torchs_loss_and_gradient_with_ignored_rows():
    import torch.nn.functional as F

    from lora_pipeline.ml.training.step import summed_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(50, 300) * 4
    targets = torch.randint(0, 300, (50,))
    targets[[3, 17, 40]] = IGNORE_INDEX
    theirs = logits.clone().requires_grad_()
    ours = logits.clone().requires_grad_()
    expected = F.cross_entropy(theirs, targets, ignore_index=IGNORE_INDEX, reduction="sum") / 47
    loss = summed_cross_entropy(ours, targets) / 47
    expected.backward()
    loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-9)
    assert not ours.grad[[3, 17, 40]].any()  # ignored rows get no gradient


def test_lean_loss_of_a_padding_free_batch_equals_the_documents_scored_alone(micro_base):
    from lora_pipeline.ml.training.attention import use_per_document_attention
    from lora_pipeline.ml.training.step import lean_loss

    model = _model(micro_base).eval()
    documents = _documents()
    with torch.no_grad():
        token_losses = [model(input_ids=d.unsqueeze(0), labels=d.unsqueeze(0)).loss * (len(d) - 1) for d in documents]
        use_per_document_attention(model)
        loss, _ = lean_loss(model, _padding_free_batch(documents))
    expected = sum(token_losses) / sum(len(d) - 1 for d in documents)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_dequant_cache_trains_bit_for_bit_like_plain_qlora(nf4_dir):
    from lora_pipeline.ml.training.dequant_cache import cache_dequantized_weights, quantized_linears

    documents = _documents()
    batch = {"input_ids": torch.cat(documents).unsqueeze(0), "labels": torch.cat(documents).unsqueeze(0)}
    results = []
    for cached in (False, True):
        # Training mode, as in the trainer: in eval mode bitsandbytes would re-lay out the weights for bf16 inference.
        model = _model(nf4_dir).train()
        held = cache_dequantized_weights(model) if cached else 0
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, held, len(quantized_linears(model))))
    (plain_loss, plain_grads, _, layers), (cached_loss, cached_grads, held, _) = results
    assert layers > 0 and held > 0
    assert torch.equal(plain_loss, cached_loss)
    assert plain_grads.keys() == cached_grads.keys()
    assert all(torch.equal(plain_grads[name], cached_grads[name]) for name in plain_grads)


def test_shared_dropout_keeps_each_adapters_rate_and_shares_only_identical_inputs(micro_base):
    from lora_pipeline.ml.training.dropout import share_dropout_masks

    model = _model(micro_base, dropout=0.5).train()
    assert share_dropout_masks(model) > 0
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict) and "default" in module.lora_A:
            module.lora_A["default"].register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach().clone()))
    model(input_ids=torch.randint(3, 200, (4, 64)))
    attention = {part: seen[f"base_model.model.model.layers.0.self_attn.{part}_proj"] for part in "qkvo"}
    mlp = {part: seen[f"base_model.model.model.layers.0.mlp.{part}_proj"] for part in ("gate", "up", "down")}
    for dropped in seen.values():
        zeroed = float((dropped == 0).float().mean())
        assert 0.45 < zeroed < 0.55  # each adapter still drops half its input
    assert torch.equal(attention["q"] == 0, attention["k"] == 0) and torch.equal(attention["k"] == 0, attention["v"] == 0)
    assert torch.equal(mlp["gate"] == 0, mlp["up"] == 0)
    assert not torch.equal(attention["q"] == 0, attention["o"] == 0)  # o_proj reads another tensor: its own mask
    assert all(module.last is None for module in model.modules() if hasattr(module, "forget"))  # nothing held


def test_cpu_dropout_masks_keep_the_rate_and_scale_and_repeat_under_a_seed():
    from lora_pipeline.ml.training.dropout import dropped_out

    x = torch.ones(256, 1024)
    torch.manual_seed(7)
    first = dropped_out(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(first, dropped_out(x, 0.1))  # masks come from torch's generator state
    assert not torch.equal(first, dropped_out(x, 0.1))  # and a new one each call
    assert abs(float((first == 0).float().mean()) - 0.1) < 0.005
    assert torch.allclose(first[first != 0], torch.tensor(1 / (1 - 6554 / 65536)))  # kept values scaled up
    assert abs(float(first.mean()) - 1.0) < 0.01  # equal in expectation
    assert dropped_out(x.to(torch.bfloat16), 0.1).dtype == torch.bfloat16


def test_padding_free_training_counts_no_padding_and_padded_training_does(micro_base, tmp_path):
    from transformers import AutoTokenizer

    from lora_pipeline.config.schema import LoraSettings, TrainingSettings
    from lora_pipeline.ml.training import StepOptions, train_adapter

    formatted = format_rows(AutoTokenizer.from_pretrained(micro_base), dataset_settings(max_rows=80),
                            eval_fraction=0.15, max_length=96)
    train = formatted.train.to_pandas()
    settings = TrainingSettings(max_steps=3, batch_size=4, max_length=96, warmup=0.0, checkpoint_every=0, logging_steps=1)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    free = train_adapter(micro_base, train, tmp_path / "free", lora, settings, CPU, "micro")
    padded = train_adapter(micro_base, train, tmp_path / "padded", lora, settings, CPU, "micro",
                           options=StepOptions(padding_free=False))
    assert free.pad_fraction == 0.0 and padded.pad_fraction > 0.05
    assert free.step_options["padding_free"] and not padded.step_options["padding_free"]
    # Same examples, same order, exact attention: the same first-step loss up to float noise.
    assert free.loss_history[0][1] == pytest.approx(padded.loss_history[0][1], rel=1e-4)


def test_the_frozen_heap_is_restored_as_it_was():
    """A process that froze its heap itself (lora-pipeline run) keeps it frozen after a hot loop; others get it back."""
    import gc

    from lora_pipeline.ml.heap import long_lived_heap_frozen

    gc.unfreeze()
    with long_lived_heap_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with long_lived_heap_frozen():
            pass
        assert gc.get_freeze_count() >= before  # not handed back to the collector
    finally:
        gc.unfreeze()
