"""Evaluation while training: the held-out loss every eval_steps, early stopping, keep_best, resumes, the plan."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from lora_pipeline.config.schema import LoraSettings, ModelConfig, TrainingSettings
from lora_pipeline.ml.base.precision import DeviceInfo
from lora_pipeline.ml.evaluation.suite import scorable_rows
from lora_pipeline.ml.training import train_adapter
from lora_pipeline.ml.training import held_out as held_out_module

from conftest import dataset_settings, format_rows, micro_config_data

CPU = DeviceInfo(device="cpu")
LORA = LoraSettings(r=8, alpha=16, dropout=0.0)


@pytest.fixture(scope="module")
def splits(micro_base):
    from transformers import AutoTokenizer

    formatted = format_rows(AutoTokenizer.from_pretrained(micro_base), dataset_settings(max_rows=160),
                            eval_fraction=0.15, max_length=96)
    return SimpleNamespace(train=formatted.train.to_pandas(), held_out=scorable_rows(formatted.eval.to_pandas()))


def _settings(**changes) -> TrainingSettings:
    return TrainingSettings(**{"max_steps": 8, "batch_size": 4, "learning_rate": 3e-3, "max_length": 96,
                               "warmup": 0.0, "logging_steps": 2, "eval_steps": 2, "checkpoint_every": 0, **changes})


def _scripted(monkeypatch, losses: dict[int, float], seen: list[int]):
    """held_out_loss answers from a script by optimizer step (read from the calls' order), so best and patience
    are what the test says, whatever a micro model's curve does."""
    steps = iter(sorted(losses))

    def scripted(model, held_out):
        step = next(steps)
        seen.append(step)
        return losses[step]

    monkeypatch.setattr(held_out_module, "held_out_loss", scripted)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_the_held_out_curve_is_eval_reports_loss_of_the_adapter(micro_base, splits, tmp_path):
    """Every eval_steps and at the last step; the last point is the per-example mean loss of the saved adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_pipeline.ml.evaluation.per_example import forward_scores

    reports = []
    result = train_adapter(micro_base, splits.train, tmp_path / "out", LORA, _settings(max_steps=7, eval_steps=3),
                           CPU, "micro", held_out=splits.held_out, progress=reports.append)
    assert [step for step, _ in result.eval_history] == [3, 6, 7]
    assert [step for step, _ in result.loss_history] == [2, 4, 6]  # the training curve keeps every logged step
    assert result.published_step == 7 and result.stopped_early_at is None
    assert [report["step"] for report in reports if "eval_loss" in report] == [3, 6, 7]  # in the run log too
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_base), tmp_path / "out")
    scores = forward_scores(model, splits.held_out, 0, 8)
    assert result.eval_history[-1][1] == pytest.approx(float(scores["loss"].mean()), abs=1e-5)
    assert result.eval_history[0][1] > result.eval_history[-1][1]  # it learns; the curve is not a constant
    assert torch.is_grad_enabled()


def test_early_stopping_ends_training_after_patience_evaluations_without_improvement(
        micro_base, splits, tmp_path, monkeypatch):
    seen = []
    _scripted(monkeypatch, {2: 3.0, 4: 2.5, 6: 2.49, 8: 2.6}, seen)
    settings = _settings(early_stopping_patience=1, early_stopping_threshold=0.05)
    result = train_adapter(micro_base, splits.train, tmp_path / "out", LORA, settings, CPU, "micro",
                           held_out=splits.held_out)
    # 2.49 is not better than 2.5 by more than the threshold: one evaluation without improvement stops it.
    assert (result.steps, result.stopped_early_at, result.best_step) == (6, 6, 4)
    assert seen == [2, 4, 6]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_keep_best_publishes_the_weights_of_the_best_evaluation_and_survives_a_resume(
        micro_base, splits, tmp_path, monkeypatch):
    """The best is step 6, between the checkpoints at 4 and 8; a run resumed from step 8 publishes step 6 too."""
    losses = {2: 3.0, 4: 2.8, 6: 2.5, 8: 2.7, 10: 2.9, 12: 3.1}
    settings = _settings(max_steps=12, keep_best=True, checkpoint_every=2)
    kept = {}

    def keep(folder, step):
        kept[step] = tmp_path / f"checkpoint-{step}"
        shutil.copytree(folder, kept[step])

    _scripted(monkeypatch, losses, [])
    whole = train_adapter(micro_base, splits.train, tmp_path / "whole", LORA, settings, CPU, "micro",
                          held_out=splits.held_out, on_checkpoint=keep)
    assert (whole.best_step, whole.published_step, whole.steps) == (6, 6, 12)
    assert [step for step, _ in whole.loss_history] == [2, 4, 6, 8, 10, 12]  # evaluated and logged at each
    best, published = _weights(kept[6]), _weights(tmp_path / "whole")
    assert all(best[name].equal(published[name]) for name in best)
    assert not all(best[name].equal(value) for name, value in _weights(kept[10]).items())

    _scripted(monkeypatch, {10: 2.9, 12: 3.1}, seen := [])
    resumed = train_adapter(micro_base, splits.train, tmp_path / "resumed", LORA, settings, CPU, "micro",
                            held_out=splits.held_out, resume_from=kept[8])
    assert seen == [10, 12]  # the evaluations before step 8 came back with the checkpoint, not run again
    assert resumed.eval_history == whole.eval_history and resumed.published_step == 6
    again = _weights(tmp_path / "resumed")
    assert all(again[name].equal(published[name]) for name in published)


def test_the_settings_that_act_on_evaluations_need_them():
    with pytest.raises(ValueError, match="training.keep_best .* set training.eval_steps"):
        TrainingSettings(keep_best=True)
    with pytest.raises(ValueError, match="training.early_stopping_patience .* set training.eval_steps"):
        TrainingSettings(early_stopping_patience=2)
    with pytest.raises(ValueError, match="SFT's only"):
        ModelConfig(**micro_config_data(training={"objective": "dpo", "eval_steps": 5}))


def test_the_memory_plan_counts_the_held_out_logits_and_the_best_copy():
    from lora_pipeline.ml.base.architectures import architecture_config
    from lora_pipeline.ml.base.memory import plan_memory
    from lora_pipeline.config.schema import QuantizationSettings

    architecture = architecture_config("Qwen/Qwen2.5-7B")
    plan = lambda **changes: plan_memory(architecture, LoraSettings(), QuantizationSettings(),  # noqa: E731
                                         TrainingSettings(max_length=2048, batch_size=1, gradient_checkpointing="on",
                                                          **changes), CPU, eval_batch_size=8)
    without, evaluating, keeping = plan(), plan(eval_steps=50), plan(eval_steps=50, keep_best=True)
    assert without.evaluation == 0
    # Eight 2,048-token rows of fp32 logits over Qwen2.5's 152,064 tokens, three times, exceed the working set of a
    # checkpointed step on one row.
    assert evaluating.evaluation > 2 * 2**30 and evaluating.total == without.total + evaluating.evaluation
    assert keeping.evaluation == evaluating.evaluation + evaluating.adapter
    assert "held-out batches of 8 x 2048 tokens" in evaluating.render()


@pytest.mark.slow
def test_the_pipeline_shows_the_held_out_curve_and_its_last_point_is_eval_reports_adapter_loss(
        write_config, fake_resources):
    import json

    import dagster as dg

    from lora_pipeline.assets import PIPELINE_ASSETS
    from lora_pipeline.assets.common import MODEL_PARTITIONS

    write_config("micro", training={"eval_steps": 3, "keep_best": True})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    result = dg.materialize(PIPELINE_ASSETS, partition_key="micro", instance=instance, resources=fake_resources)
    adapter = {key: value.value for key, value in
               result.asset_materializations_for_node("trained_adapter")[0].metadata.items()}
    assert adapter["evaluations"] == 3 and adapter["published_step"] == adapter["best_step"]  # steps 3, 6, 8
    assert adapter["loss_curve"].startswith("![training and held-out loss](data:image/png;base64,")
    assert "evaluation" in adapter["memory_plan"]
    store = fake_resources["storage"]
    metrics = json.loads((store.local_path(store.current("micro", "eval_report")) / "metrics.json").read_text())
    assert adapter["best_held_out_loss"] == pytest.approx(metrics["adapter"]["loss"], abs=2e-3)
