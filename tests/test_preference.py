"""Preference tuning, the ML side (issue 27, part 1): pairs in other tools' layouts, rendered with a real family's
template; DPO from a starting adapter kept as the reference; held-out preference accuracy against it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lora_pipeline.errors import DataError
from lora_pipeline.ml.base.families import tokenizer_dir
from lora_pipeline.ml.data.templates import resolve_template
from lora_pipeline.ml.preference.data import is_preference, pairs_of, tokenize_pairs


def _where(index: int) -> str:
    return f"pairs.jsonl: line {index + 1}"


LAYOUTS = {
    "strings": {"prompt": "What is 2 plus 2?", "chosen": "It is 4.", "rejected": "It is 5."},
    "conversations sharing a prefix": {
        "chosen": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."}],
        "rejected": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 5."}]},
    "prompt messages and answer messages": {
        "prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
        "chosen": [{"role": "assistant", "content": "It is 4."}],
        "rejected": {"role": "assistant", "content": "It is 5."}},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2 plus 2?"}],
                 "chosen": {"from": "gpt", "value": "It is 4."}, "rejected": {"from": "gpt", "value": "It is 5."}},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_becomes_the_same_pair(layout):
    frame = pd.DataFrame([{key: json.dumps(value) if not isinstance(value, str) else value
                           for key, value in LAYOUTS[layout].items()}])
    assert is_preference(frame)
    pair, = pairs_of(frame, _where)
    assert pair.prompt == [{"role": "user", "content": "What is 2 plus 2?"}]
    assert pair.chosen == {"role": "assistant", "content": "It is 4."}
    assert pair.rejected == {"role": "assistant", "content": "It is 5."}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, r"line 1: 'chosen' and 'rejected' are the same answer"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, r"line 1: field 'chosen' is empty"),
    ({"chosen": "a", "rejected": "b"}, r"line 1: no prompt"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, r"line 1: field 'chosen' must be text, a message"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     r"line 1: 'chosen' and 'rejected' are conversations that differ before their last message"),
])
def test_bad_pairs_are_refused_with_the_row_and_the_field(row, message):
    with pytest.raises(DataError, match=message):
        pairs_of(pd.DataFrame([row]), _where)


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir("qwen3"))


def _pairs(count: int) -> pd.DataFrame:
    """A preference a tiny model can learn: the polite answer over the curt one, to varied questions."""
    return pd.DataFrame([{"prompt": f"Question {i}: what comes after {i}?", "chosen": f"Gladly: {i + 1}.",
                          "rejected": f"Whatever, {i + 1}."} for i in range(count)])


def test_pairs_render_with_the_family_template_and_each_prompt_stays_on_one_side(qwen3_tokenizer):
    tokenizer = qwen3_tokenizer
    frame = pd.concat([_pairs(40), _pairs(40).assign(rejected=lambda f: f["rejected"] + " Fine.")])
    template = resolve_template("tokenizer", "messages", tokenizer.chat_template)
    examples = tokenize_pairs(pairs_of(frame.reset_index(drop=True), _where), tokenizer, template, _where, 0.25, 512)
    table = examples.frame
    first = table.iloc[0]
    assert first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["chosen"] == "<think>\n\n</think>\n\nGladly: 1.<|im_end|>"
    assert tokenizer.decode(first["chosen_ids"]) == first["chosen"]
    assert examples.too_long == 0
    # The two pairs of each prompt share its side of the split.
    assert table.groupby("prompt")["held_out"].nunique().eq(1).all() and 0 < table["held_out"].sum() < len(table)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    from lora_pipeline.ml.base.families import build_family_model

    return build_family_model("qwen3", tmp_path_factory.mktemp("qwen3"))


def _start_adapter(base_dir, folder):
    """A starting (SFT-like) adapter with non-zero weights, so it differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    return folder


def test_dpo_from_a_starting_adapter_beats_it_as_the_reference_on_held_out_pairs(tmp_path, tiny_qwen3, qwen3_tokenizer):
    from lora_pipeline.ml.preference.evaluation import preference_report, score_on_base
    from lora_pipeline.ml.preference.training import PreferenceSettings, train_preference

    template = resolve_template("tokenizer", "messages", qwen3_tokenizer.chat_template)
    table = tokenize_pairs(pairs_of(_pairs(64), _where), qwen3_tokenizer, template, _where, 0.25, 512).frame
    train, held_out = table[~table["held_out"]], table[table["held_out"]]
    start = _start_adapter(tiny_qwen3, tmp_path / "sft")
    settings = PreferenceSettings(beta=0.1, learning_rate=5e-3, batch_size=8, max_steps=8, max_length=128)
    result = train_preference(tiny_qwen3, train, tmp_path / "dpo", settings, start_adapter=start)
    assert result.reference.startswith("the starting adapter")
    assert result.margin_history[0] == 0.0 and result.margin_history[-1] > 0  # rewards 0 before any update
    assert result.loss_history[-1] < result.loss_history[0]
    scores = score_on_base(tiny_qwen3, {"tuned": tmp_path / "dpo", "reference": start}, held_out)
    report = preference_report(scores["tuned"], scores["reference"], settings.beta)
    assert report["better_than_reference"], report
    assert report["preference_accuracy"]["tuned"]["value"] > report["preference_accuracy"]["reference"]["value"]
    assert report["reward_margin"]["value"] > 0


def test_a_run_whose_margins_never_move_fails_with_what_to_check(tmp_path, tiny_qwen3, qwen3_tokenizer):
    from lora_pipeline.ml.preference.training import PreferenceSettings, PreferenceTrainingError, train_preference

    template = resolve_template("tokenizer", "messages", qwen3_tokenizer.chat_template)
    table = tokenize_pairs(pairs_of(_pairs(24), _where), qwen3_tokenizer, template, _where, 0.25, 512).frame
    start = _start_adapter(tiny_qwen3, tmp_path / "sft")
    settings = PreferenceSettings(learning_rate=0.0, batch_size=4, max_steps=4, max_length=128)
    with pytest.raises(PreferenceTrainingError, match=r"reward margins did not move.*learning rate \(0:"):
        train_preference(tiny_qwen3, table, tmp_path / "dpo", settings, start_adapter=start)


def test_a_resumed_run_ends_where_the_whole_run_ends(tmp_path, tiny_qwen3, qwen3_tokenizer):
    """Checkpoints every 2 steps (handed over as they are written); a run resumed from step 2 of a starting adapter
    finishes with the adapter an uninterrupted run makes: optimizer, scheduler, data order and reference restored."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from lora_pipeline.ml.preference.training import PreferenceSettings, train_preference

    template = resolve_template("tokenizer", "messages", qwen3_tokenizer.chat_template)
    table = tokenize_pairs(pairs_of(_pairs(32), _where), qwen3_tokenizer, template, _where, 0.0, 512).frame
    start = _start_adapter(tiny_qwen3, tmp_path / "sft")
    settings = PreferenceSettings(learning_rate=5e-3, batch_size=4, max_steps=4, max_length=128, checkpoint_every=2)
    kept = {}

    def keep(folder, step):
        kept[step] = shutil.copytree(folder, tmp_path / f"kept-{step}")

    whole = train_preference(tiny_qwen3, table, tmp_path / "whole", settings, start_adapter=start, on_checkpoint=keep)
    assert sorted(kept) == [2] and whole.steps == 4  # the last step is saved as the adapter, not a checkpoint
    logs = []
    resumed = train_preference(tiny_qwen3, table, tmp_path / "resumed", settings, start_adapter=start,
                               resume_from=kept[2], on_log=lambda step, entry: logs.append((step, entry)))
    assert resumed.steps == 4 and resumed.resumed_from_step == 2 and resumed.logged_steps == [3, 4]
    assert [step for step, entry in logs if "loss" in entry] == [3, 4]
    finished = [load_file(folder / "adapter_model.safetensors") for folder in (tmp_path / "whole", tmp_path / "resumed")]
    assert finished[0].keys() == finished[1].keys()
    assert all(torch.allclose(finished[0][name], finished[1][name], atol=1e-6) for name in finished[0])


def test_a_fresh_lora_trains_to_the_same_adapter_twice_with_one_seed(tmp_path, tiny_qwen3, qwen3_tokenizer):
    import torch
    from safetensors.torch import load_file

    from lora_pipeline.config.schema import LoraSettings
    from lora_pipeline.ml.preference.training import PreferenceSettings, train_preference

    template = resolve_template("tokenizer", "messages", qwen3_tokenizer.chat_template)
    table = tokenize_pairs(pairs_of(_pairs(16), _where), qwen3_tokenizer, template, _where, 0.0, 512).frame
    settings = PreferenceSettings(learning_rate=5e-3, batch_size=4, max_steps=2, max_length=128, seed=3)
    torch.manual_seed(1)  # whatever ran before in the process
    train_preference(tiny_qwen3, table, tmp_path / "one", settings, lora=LoraSettings(), model_type="qwen3")
    torch.manual_seed(2)
    train_preference(tiny_qwen3, table, tmp_path / "two", settings, lora=LoraSettings(), model_type="qwen3")
    one, two = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_the_shipped_pairs_are_what_their_generator_writes():
    from lora_pipeline.data.generate_preferences import OUTPUT, generate

    shipped = json.loads(OUTPUT.read_text(encoding="utf-8"))
    assert shipped == generate()
    assert all(row["chosen"] != row["rejected"] and row["prompt"] for row in shipped)
