"""Preference tuning beyond DPO (KTO and ORPO, one setting apart): KTO's unpaired rows parsed, rendered and split
like pairs; pairs unpaired for KTO with every KL row pairing a prompt with another prompt's answer; the ids TRL's
trainers see are ours; each objective learns the DPO test's pairs from a starting adapter, and a run that does
not learn fails with what to check."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lora_pipeline.errors import DataError
from lora_pipeline.ml.base.families import tokenizer_dir
from lora_pipeline.ml.data.templates import resolve_template
from lora_pipeline.ml.preference.data import (is_unpaired, kto_rows_of, pairs_of, tokenize_kto_rows, tokenize_pairs,
                                              unpair)

from test_preference import _pairs, _start_adapter, _where

KTO_LAYOUTS = {
    "strings": {"prompt": "What is 2 plus 2?", "completion": "It is 4.", "label": True},
    "messages": {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
                 "completion": [{"role": "assistant", "content": "It is 4."}], "label": 1},
    "sharegpt messages": {"prompt": {"from": "human", "value": "What is 2 plus 2?"},
                          "completion": {"from": "gpt", "value": "It is 4."}, "label": "true"},
    "conversation in the completion": {
        "prompt": None, "completion": [{"role": "user", "content": "What is 2 plus 2?"},
                                       {"role": "assistant", "content": "It is 4."}], "label": " True "},
}


@pytest.mark.parametrize("layout", sorted(KTO_LAYOUTS))
def test_every_kto_layout_becomes_the_same_row(layout):
    frame = pd.DataFrame([{key: json.dumps(value) if isinstance(value, (list, dict)) else value
                           for key, value in KTO_LAYOUTS[layout].items()}])
    assert is_unpaired(frame)
    row, = kto_rows_of(frame, _where)
    assert row.prompt == [{"role": "user", "content": "What is 2 plus 2?"}]
    assert row.completion == {"role": "assistant", "content": "It is 4."}
    assert row.label is True


@pytest.mark.parametrize("label, expected", [(False, False), (0, False), ("false", False), ("0", False),
                                             (np.bool_(True), True), (1.0, True)])
def test_kto_labels_read_as_bools(label, expected):
    row, = kto_rows_of(pd.DataFrame([{"prompt": "q", "completion": "a", "label": label}]), _where)
    assert row.label is expected


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "completion": "a", "label": "maybe"}, r"line 1: field 'label' must be true or false.*'maybe'"),
    ({"prompt": "q", "completion": "a", "label": 2}, r"line 1: field 'label' must be true or false"),
    ({"prompt": "q", "completion": "a", "label": None}, r"line 1: field 'label' must be true or false"),
    ({"prompt": "q", "completion": " ", "label": True}, r"line 1: field 'completion' is empty"),
    ({"prompt": "q", "completion": 3, "label": True}, r"line 1: field 'completion' must be text, a message"),
    ({"prompt": ["q", 4], "completion": "a", "label": True}, r"line 1: field 'prompt' must be text, a message"),
    ({"prompt": None, "completion": "a", "label": True}, r"line 1: no prompt"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "label": True}, r"line 1: field 'completion' ends with a user message"),
])
def test_bad_kto_rows_are_refused_with_the_row_and_the_field(row, message):
    with pytest.raises(DataError, match=message):
        kto_rows_of(pd.DataFrame([row]), _where)


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir("qwen3"))


def _template(tokenizer):
    return resolve_template("tokenizer", "messages", tokenizer.chat_template)


def _kto_frame(count: int) -> pd.DataFrame:
    """The DPO test's preference as KTO's own rows: two polite answers and a curt one to each question."""
    rows = []
    for i in range(count):
        rows += [{"prompt": f"Question {i}: what comes after {i}?", "completion": f"Gladly: {i + 1}.", "label": True},
                 {"prompt": f"Question {i}: what comes after {i}?", "completion": f"Whatever, {i + 1}.",
                  "label": False}]
    return pd.DataFrame(rows)


def test_kto_rows_render_like_pairs_and_each_prompt_stays_on_one_side(qwen3_tokenizer):
    tokenizer, template = qwen3_tokenizer, _template(qwen3_tokenizer)
    examples = tokenize_kto_rows(kto_rows_of(_kto_frame(40), _where), tokenizer, template, _where, 0.25, 512)
    table = examples.frame
    first = table.iloc[0]
    assert first["prompt"].endswith("<|im_start|>assistant\n") and first["label"]
    assert first["completion"] == "<think>\n\n</think>\n\nGladly: 1.<|im_end|>"
    assert tokenizer.decode(first["completion_ids"]) == first["completion"] and examples.too_long == 0
    assert table["label"].dtype == bool
    assert table.groupby("prompt")["held_out"].nunique().eq(1).all() and 0 < table["held_out"].sum() < len(table)
    # A pair and the two rows it unpairs into are the same ids, on the same side of the split.
    pairs = tokenize_pairs(pairs_of(_pairs(40), _where), tokenizer, template, _where, 0.25, 512).frame
    unpaired = unpair(pairs)
    assert len(unpaired) == 2 * len(pairs) and unpaired["label"].tolist()[:4] == [True, False, True, False]
    for column in ("prompt_ids", "completion_ids", "held_out", "content_hash"):
        assert unpaired[column].map(str).tolist() == table[column].map(str).tolist(), column


def test_kto_batches_pair_each_prompt_with_another_prompts_answer():
    from lora_pipeline.ml.preference.objectives import kto_rows
    from lora_pipeline.ml.preference.training import PreferenceSettings

    pairs = pd.DataFrame({"prompt_ids": [[i] for i in range(10)], "chosen_ids": [[100 + i] for i in range(10)],
                          "rejected_ids": [[200 + i] for i in range(10)]})
    rows, per_step = kto_rows(pairs, PreferenceSettings(objective="kto", batch_size=3))
    assert per_step == 6 and len(rows) == 20
    for start in range(0, len(rows), per_step):
        batch = rows.iloc[start:start + per_step]
        assert batch["label"].tolist() == [True] * (len(batch) // 2) + [False] * (len(batch) // 2)
        answers = batch["completion_ids"].tolist()
        assert batch["KL_completion_ids"].tolist() == answers[-1:] + answers[:-1]  # TRL's rotation, within the batch
        if len(batch) > 2:  # a batch of one pair has no other prompt
            kl_prompts = [ids[0] % 100 for ids in batch["KL_completion_ids"]]
            assert all(prompt[0] != kl for prompt, kl in zip(batch["prompt_ids"], kl_prompts))
    assert sorted(map(tuple, rows["completion_ids"])) == sorted([(100 + i,) for i in range(10)]
                                                                + [(200 + i,) for i in range(10)])
    with pytest.raises(ValueError, match="KTO needs batch_size of at least 2 rows"):
        kto_rows(unpair(pairs), PreferenceSettings(objective="kto", batch_size=1))


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    from lora_pipeline.ml.base.families import build_family_model

    return build_family_model("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.mark.parametrize("objective", ["kto", "orpo"])
def test_the_trainer_sees_our_ids_with_a_template_that_writes_bos(tmp_path, objective):
    """Llama 3's template writes <|begin_of_text|> itself: TRL must neither add another nor re-tokenize."""
    from transformers import AutoTokenizer

    from lora_pipeline.config.schema import LoraSettings
    from lora_pipeline.ml.base.families import build_family_model
    from lora_pipeline.ml.preference.objectives import build_trainer, kto_rows
    from lora_pipeline.ml.preference.training import PreferenceSettings, load_policy

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("llama3"))
    table = tokenize_pairs(pairs_of(_pairs(8), _where), tokenizer, _template(tokenizer), _where, 0.0, 512).frame
    base = build_family_model("llama3", tmp_path / "llama3")
    settings = PreferenceSettings(objective=objective, batch_size=2, max_steps=1, max_length=128)
    tokenizer, model = load_policy(base, lora=LoraSettings(dropout=0.0), model_type="llama")
    trainer, _ = build_trainer(settings, model, tokenizer, table, tmp_path / "trainer", [])
    batch = next(iter(trainer.get_train_dataloader()))
    bos = tokenizer.bos_token_id

    def unpadded(ids, mask):
        return [int(token) for token, keep in zip(ids, mask) if keep]

    if objective == "kto":
        rows, _ = kto_rows(table, settings)
        for index, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            expected = rows["prompt_ids"][index] + rows["completion_ids"][index]
            assert unpadded(ids, mask) == expected and expected.count(bos) == 1
            kl = unpadded(batch["KL_input_ids"][index], batch["KL_attention_mask"][index])
            assert kl == rows["prompt_ids"][index] + rows["KL_completion_ids"][index]
        assert batch["label"].tolist() == [True, True, False, False]
    else:
        ours = {side: {tuple(p + a) for p, a in zip(table["prompt_ids"], table[f"{side}_ids"])}
                for side in ("chosen", "rejected")}
        for side in ("chosen", "rejected"):
            for ids, mask, labels in zip(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                                         batch[f"{side}_labels"]):
                seen = unpadded(ids, mask)
                assert tuple(seen) in ours[side] and seen.count(bos) == 1
                answer = [int(label) for label in labels if label != -100]  # the prompt is masked
                assert seen[-len(answer):] == answer and answer[-1] == tokenizer.eos_token_id


def test_dpo_batches_hold_pairs_of_like_length(tmp_path):
    """A DPO batch is padded to its longest answer twice: the sampler groups pairs by prompt + longer answer."""
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lora_pipeline.config.schema import LoraSettings
    from lora_pipeline.ml.base.families import build_family_model
    from lora_pipeline.ml.preference.objectives import build_trainer
    from lora_pipeline.ml.preference.training import PreferenceSettings, load_policy

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("llama3"))
    pairs = pd.DataFrame([{"prompt": f"Say {word} {count} times.", "chosen": " ".join([word] * count),
                           "rejected": "No."} for count, word in zip([1, 30, 2, 29, 3, 28, 4, 27],
                                                                      ["red", "blue", "green", "gold"] * 2)])
    table = tokenize_pairs(pairs_of(pairs, _where), tokenizer, _template(tokenizer), _where, 0.0, 512).frame
    base = build_family_model("llama3", tmp_path / "llama3")
    settings = PreferenceSettings(objective="dpo", batch_size=2, max_steps=1, max_length=128)
    tokenizer, model = load_policy(base, lora=LoraSettings(dropout=0.0), model_type="llama")
    trainer, _ = build_trainer(settings, model, tokenizer, table, tmp_path / "trainer", [])
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    lengths = trainer.train_dataset["length"]
    assert lengths == [len(p) + max(len(c), len(r)) for p, c, r in
                       zip(table["prompt_ids"], table["chosen_ids"], table["rejected_ids"])]
    batch = next(iter(trainer.get_train_dataloader()))  # the collator takes the rows with their length column
    assert batch["input_ids"].shape[0] == 4


def _train_and_held_out(tokenizer):
    table = tokenize_pairs(pairs_of(_pairs(64), _where), tokenizer, _template(tokenizer), _where, 0.25, 512).frame
    return table[~table["held_out"]], table[table["held_out"]]


def test_kto_on_the_dpo_pairs_from_a_starting_adapter_beats_it_on_held_out_pairs(tmp_path, tiny_qwen3,
                                                                                   qwen3_tokenizer):
    from lora_pipeline.ml.preference.evaluation import label_report, preference_report, score_on_base, unpaired_scores
    from lora_pipeline.ml.preference.training import PreferenceSettings, train_preference

    train, held_out = _train_and_held_out(qwen3_tokenizer)
    start = _start_adapter(tiny_qwen3, tmp_path / "sft")
    settings = PreferenceSettings(objective="kto", beta=0.1, learning_rate=5e-3, batch_size=4, max_steps=6,
                                  max_length=128)
    result = train_preference(tiny_qwen3, train, tmp_path / "kto", settings, start_adapter=start)
    assert result.reference.startswith("the starting adapter") and result.objective == "kto"
    assert result.margin_history[0] == 0.0 and result.margin_history[-1] > 0  # rewards 0 before any update
    assert result.loss_history[-1] < result.loss_history[0] and len(result.extra_history["kl"]) == result.steps
    adapters = {"tuned": tmp_path / "kto", "reference": start}
    scores = score_on_base(tiny_qwen3, adapters, held_out)
    report = preference_report(scores["tuned"], scores["reference"], settings.beta)
    assert report["better_than_reference"], report
    # The same held-out pairs as KTO's rows: each answer's reward has its label's sign.
    rows = {name: unpaired_scores(frame) for name, frame in scores.items()}
    labels = label_report(rows["tuned"], rows["reference"], settings.beta)
    assert labels["rows"] == 2 * len(held_out) and labels["desirable"] == len(held_out)
    assert labels["label_accuracy"]["reference"]["value"] == 0.5
    assert labels["label_accuracy"]["tuned"]["value"] > 0.5, labels
    assert labels["reward"]["desirable"]["value"] > labels["reward"]["undesirable"]["value"]
    # Scoring the unpaired rows themselves gives the same figures, row for row.
    few = unpair(held_out.head(2))
    direct = score_on_base(tiny_qwen3, adapters, few)
    for name in adapters:
        assert direct[name]["label"].tolist() == rows[name]["label"].head(4).tolist()
        assert np.allclose(direct[name]["completion_logp"], rows[name]["completion_logp"].head(4), atol=1e-4)


def test_orpo_from_a_starting_adapter_learns_the_pairs_without_a_reference(tmp_path, tiny_qwen3, qwen3_tokenizer):
    from lora_pipeline.ml.preference.evaluation import preference_report, score_on_base
    from lora_pipeline.ml.preference.training import PreferenceSettings, train_preference

    train, held_out = _train_and_held_out(qwen3_tokenizer)
    start = _start_adapter(tiny_qwen3, tmp_path / "sft")
    settings = PreferenceSettings(objective="orpo", beta=0.1, learning_rate=5e-3, batch_size=4, max_steps=6,
                                  max_length=128)
    result = train_preference(tiny_qwen3, train, tmp_path / "orpo", settings, start_adapter=start)
    assert result.reference.startswith("none") and result.objective == "orpo"
    assert result.loss_history[-1] < result.loss_history[0]
    assert result.margin_history[-1] > result.margin_history[0]
    odds = result.extra_history["log_odds_ratio"]
    assert odds[-1] > odds[0]  # log sigmoid of the chosen answer's log odds over the rejected one's
    scores = score_on_base(tiny_qwen3, {"tuned": tmp_path / "orpo", "reference": start}, held_out)
    report = preference_report(scores["tuned"], scores["reference"], settings.beta)
    assert report["preference_accuracy"]["tuned"]["value"] > 0.5, report


@pytest.mark.parametrize("objective, message", [
    ("kto", r"the rewards did not move.*learning rate \(0:"),
    ("orpo", r"the adapter did not change.*learning rate \(0:"),
], ids=["kto", "orpo"])
def test_a_run_that_does_not_learn_fails_with_what_to_check(tmp_path, tiny_qwen3, qwen3_tokenizer, objective, message):
    from lora_pipeline.ml.preference.training import PreferenceSettings, PreferenceTrainingError, train_preference

    if objective == "kto":  # KTO's own rows
        table = tokenize_kto_rows(kto_rows_of(_kto_frame(6), _where), qwen3_tokenizer, _template(qwen3_tokenizer),
                                  _where, 0.0, 512).frame
    else:
        table = tokenize_pairs(pairs_of(_pairs(6), _where), qwen3_tokenizer, _template(qwen3_tokenizer), _where,
                               0.0, 512).frame
    start = _start_adapter(tiny_qwen3, tmp_path / "sft")
    settings = PreferenceSettings(objective=objective, learning_rate=0.0, batch_size=2, max_steps=2, max_length=128)
    with pytest.raises(PreferenceTrainingError, match=message):
        train_preference(tiny_qwen3, table, tmp_path / objective, settings, start_adapter=start)


@pytest.mark.parametrize("objective", ["kto", "orpo"])
def test_kto_and_orpo_learn_on_a_4bit_base(tmp_path, tiny_qwen3, qwen3_tokenizer, objective):
    """QLoRA: KTO's policy is restored from the reference TRL copied before casting it to bf16 (without that the
    reference check fails before the first step), and both learn through the 4-bit layers."""
    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.base.quantize import quantize_base
    from lora_pipeline.ml.preference.training import PreferenceSettings, train_preference

    nf4 = tmp_path / "nf4"
    quantize_base(tiny_qwen3, nf4, "nf4", True, "float32", DeviceInfo(device="cpu"))
    table = tokenize_pairs(pairs_of(_pairs(8), _where), qwen3_tokenizer, _template(qwen3_tokenizer), _where, 0.0,
                           512).frame
    start = _start_adapter(tiny_qwen3, tmp_path / "sft")
    settings = PreferenceSettings(objective=objective, learning_rate=5e-3, batch_size=4, max_steps=2, max_length=128)
    result = train_preference(nf4, table, tmp_path / objective, settings, start_adapter=start)
    assert result.steps == 2 and (tmp_path / objective / "adapter_model.safetensors").exists()
    if objective == "kto":
        assert result.margin_history[0] == 0.0 and result.margin_history[-1] > 0
    else:
        assert result.extra_history["log_odds_ratio"][-1] > result.extra_history["log_odds_ratio"][0]


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo"])
def test_the_closing_summary_is_not_read_as_a_logged_step(objective):
    """TRL adds the rewards of steps not yet logged (steps not a multiple of logging_steps) to the summary it logs
    at the end, which has train_loss and no loss."""
    from lora_pipeline.ml.preference.objectives import watch_for
    from lora_pipeline.ml.preference.training import PreferenceSettings

    watch = watch_for(PreferenceSettings(objective=objective))
    step = {"loss": 0.6, "rewards/margins": 0.1, "rewards/chosen": 0.2, "rewards/rejected": 0.1, "kl": 0.0,
            "log_odds_ratio": -0.6, "nll_loss": 2.0}
    watch.record(step)
    watch.record({"train_loss": 0.6, **{key: value for key, value in step.items() if key != "loss"}})
    assert watch.losses == [0.6] and watch.margins == [0.1]
