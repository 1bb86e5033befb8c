"""`lora-pipeline chat` and its session (ml/chat.py): one loaded base, every adapter attached, a conversation kept
and rendered each turn as training rendered its data, answers streamed; `generate` is one turn of the same session."""

from __future__ import annotations

import io
import json

import pytest

from test_cli import _cli

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def adapters(micro_base, tmp_path_factory):
    """Two adapters of the micro base saved as the pipeline saves them (weights and tokenizer in one folder), their
    lora_B perturbed so that each answers differently, as trained ones do: name -> folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-adapters")
    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    saved = {}
    for seed, name in enumerate(("alpaca", "chatml"), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.add_(torch.randn_like(parameter) * 0.5)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        saved[name] = folder / name
    return saved


# Each adapter trained on another template: every one must get the conversation its own way.
STYLES = {"alpaca": ("alpaca", "auto"), "chatml": ("sharegpt", "chatml")}


@pytest.fixture
def session(micro_base, adapters):
    from lora_pipeline.ml.adapters import PromptStyle
    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.chat import ChatSession

    styles = {name: PromptStyle(fmt, template=template) for name, (fmt, template) in STYLES.items()}
    return ChatSession.load(micro_base, adapters, styles, DeviceInfo(device="cpu"), max_new_tokens=12)


def _count_base_loads(monkeypatch) -> list:
    """Every AutoModelForCausalLM.from_pretrained call from now on, recorded (and still made)."""
    from transformers import AutoModelForCausalLM

    loads, original = [], AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    return loads


def test_a_conversation_keeps_its_history_for_every_adapter_on_one_loaded_base(micro_base, adapters, monkeypatch):
    from lora_pipeline.ml.adapters import PromptStyle
    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.chat import ChatSession

    loads = _count_base_loads(monkeypatch)
    styles = {name: PromptStyle(fmt, template=template) for name, (fmt, template) in STYLES.items()}
    session = ChatSession.load(micro_base, adapters, styles, DeviceInfo(device="cpu"), max_new_tokens=8)
    asked = []
    generate = session.model.generate
    monkeypatch.setattr(session.model, "generate", lambda **kw: asked.append(kw["input_ids"][0].tolist()) or
                        generate(**kw))
    tokenizer = session.tokenizers["alpaca"]

    first = session.reply("What is 2 plus 3?")
    second = session.reply("And 4 plus 4?")
    assert [message["role"] for message in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == first and session.history[3]["content"] == second
    # The second prompt is the first turn, its answer closed by EOS as training closed every answer, then the new one.
    assert asked[1][: len(asked[0])] == asked[0]
    rendered = tokenizer.decode(asked[1])
    assert rendered.startswith("### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n")
    assert rendered.endswith(f"{tokenizer.eos_token}### Instruction:\nAnd 4 plus 4?\n\n### Response:\n")

    # Another adapter reads the same history through its own template; switching loads nothing.
    session.use("chatml")
    session.reply("Thanks.")
    chatml = tokenizer.decode(asked[2])
    assert chatml.startswith("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n")
    assert chatml.endswith("<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n")
    session.use("base")
    session.reply("Bye.")
    assert asked[3][: len(asked[1])] == asked[1]  # the base is asked as the first adapter is
    assert len(loads) == 1 and str(loads[0]) == str(micro_base)

    assert session.reset() == 4 and session.history == []
    session.reply("Hi")
    assert tokenizer.decode(asked[-1]).startswith("### Instruction:\nHi\n")


def test_use_refuses_an_unknown_name_with_the_names_and_the_closest(session):
    from lora_pipeline.ml.chat import UnknownModel

    with pytest.raises(UnknownModel, match=r"unknown model 'chatm'; did you mean 'chatml'\? "
                                           r"\(choose from: base, alpaca, chatml\)"):
        session.use("chatm")
    assert session.active == "alpaca"
    session.use("base")
    assert session.active == "base"


def test_compare_answers_the_same_history_with_every_model_and_generate_is_its_one_turn(session):
    from lora_pipeline.ml.adapters import prompt_ids, using
    from lora_pipeline.ml.chat import BASE
    from lora_pipeline.ml.evaluation.per_example import greedy_answers

    with pytest.raises(ValueError, match="no message to compare"):
        session.compare()
    first = session.compare("What is 2 plus 3?")
    assert list(first) == ["base", "alpaca", "chatml"]
    assert session.history[-1]["content"] == first["alpaca"]  # the active model's answer is kept
    # As generate answered before it was a session: greedy, the prompt as training put it, the base asked as the first.
    for name, answer in first.items():
        asker = "alpaca" if name == BASE else name
        tokenizer, style = session.tokenizers[asker], session.styles[asker]
        with using(session.model, None if name == BASE else name):
            assert greedy_answers(session.model, tokenizer, [prompt_ids(tokenizer, "What is 2 plus 3?", style)],
                                  12, 1) == [answer]
    history = list(session.history)
    assert session.compare() == first and session.history == history  # the last turn again, nothing kept
    session.reply("And 4 plus 4?")
    again = session.compare()
    assert again["alpaca"] == session.history[-1]["content"] and len(session.history) == 4


def test_answers_stream_piece_by_piece_as_tokens_are_generated(session):
    forward_calls, seen = [0], []

    def count(*_):
        forward_calls[0] += 1

    session.model.base_model.model.register_forward_pre_hook(count)
    session.use("base")
    answer = session.reply("Tell me a story.", stream=lambda piece: seen.append((forward_calls[0], piece)))
    pieces = [piece for _, piece in seen]
    assert len(pieces) > 2 and "".join(pieces) == answer
    # Pieces arrive between forward passes, not all once generation is over.
    calls = [count for count, _ in seen]
    assert calls == sorted(calls) and calls[0] < forward_calls[0] and len(set(calls)) > 2


def test_text_pieces_wait_for_a_whole_character_and_hold_back_whitespace():
    from lora_pipeline.ml.chat import TextPieces

    class Bytes:  # a tokenizer whose tokens are bytes, so one character can take two
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    pieces = []
    stream = TextPieces(Bytes(), pieces.append)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt, not streamed
    for token in " né \n".encode():
        stream.put(torch.tensor([token]))
    stream.end()
    assert pieces == ["n", "é"]


def test_family_templates_render_the_conversation_as_training_rendered_it():
    """Each real family's own template, several turns and a system prompt: the ids asked for the last answer are
    the prompt training put before it (render_chats), Qwen3's earlier reasoning left out as its template does."""
    from transformers import AutoTokenizer

    from lora_pipeline.ml.adapters import PromptStyle
    from lora_pipeline.ml.base.families import FAMILIES, tokenizer_dir
    from lora_pipeline.ml.chat import ChatSession
    from lora_pipeline.ml.data.templates import render_chats, resolve_template

    for family in FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
        style = PromptStyle("messages", template="tokenizer", system_prompt="Be brief.")
        session = ChatSession(None, {family: tokenizer}, {family: style})
        session.history = [{"role": "user", "content": "What is 2 plus 2?"},
                           session.assistant_message("<think>\nTwo and two.\n</think>\n\n4."),
                           {"role": "user", "content": "And 3 plus 3?"}]
        assert session.history[1] == {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."}
        template = resolve_template("tokenizer", "messages", tokenizer.chat_template)
        chat = [{"role": "system", "content": "Be brief."}, *session.history, {"role": "assistant", "content": "6."}]
        trained = render_chats(tokenizer, template, [chat], [None], str).prompt[-1]
        asked = session.prompt_ids(family)
        assert asked == tokenizer(trained, add_special_tokens=False)["input_ids"], family
        text = tokenizer.decode(asked)
        assert "Be brief." in text and "What is 2 plus 2?" in text and "4." in text and "And 3 plus 3?" in text
        if family == "qwen3":
            assert "Two and two." not in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_chat_command_one_base_switch_compare_reset_and_generate_agrees(write_config, tmp_path, monkeypatch, capsys):
    """Trains a micro adapter (about 15 s), then drives `chat` with piped input, in this process to count loads."""
    from lora_pipeline.cli import main

    store = str(tmp_path / "store")
    path = write_config("micro-chat", training={"max_steps": 4})
    done = _cli(["run", str(path), "--select", "+trained_adapter", "--storage", store], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    loads = _count_base_loads(monkeypatch)
    lines = ["What is 2 plus 3?", "And 4 plus 4?", "/adapters", "/use micro_chat", "/use half", "/compare",
             "/compare Name a colour.", "/reset", "/compare", "/use base", "Hi", "/help", "/usee half", "/quit",
             "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code = main(["chat", str(path), "--storage", store, "--max-new-tokens", "8", "--blend", "half=linear:0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(loads) == 1
    assert "adapters attached: micro-chat, half (blend)" in out and "answering: micro-chat" in out
    assert "you> And 4 plus 4?\nmicro-chat> " in out
    assert "* micro-chat (adapter)" in out and "  base (no adapter)" in out and "  half (blend)" in out
    assert "error: unknown model 'micro_chat'; did you mean 'micro-chat'? (choose from: base, micro-chat, half)" in err
    compared = out.split("you> /compare\n")[1].split("you> ")[0]
    assert compared.startswith("=== base (no adapter)\n") and "=== micro-chat (adapter)\n" in compared
    assert "=== half (blend, answering)\n" in compared
    assert "conversation cleared (3 turns forgotten)" in out
    assert "error: nothing to compare yet" in err
    assert "you> Hi\nbase> " in out and "never read" not in out
    assert "you> /help\ncommands:\n  /adapters" in out
    assert "error: unknown command /usee (did you mean /use?)" in err

    # generate is one turn of the same session: its answers are the first /compare's of a fresh chat.
    assert main(["generate", str(path), "--storage", store, "--max-new-tokens", "8", "--prompt", "What is 2 plus 3?",
                 "--json"]) == 0
    answers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answers"]
    monkeypatch.setattr("sys.stdin", io.StringIO("/compare What is 2 plus 3?\n"))
    assert main(["chat", str(path), "--storage", store, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    for name, answer in answers.items():
        title = "base (no adapter)" if name == "base" else f"{name} (adapter, answering)"
        assert f"=== {title}\n{answer or '(empty answer)'}\n" in out
    assert len(loads) == 3  # one per command

    # Sampled, starting with the bare base; a name that is none of them is refused before anything loads.
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", str(path), "--storage", store, "--adapter", "base", "--temperature", "0.7",
                 "--max-new-tokens", "8"]) == 0
    assert "answering: base" in capsys.readouterr().out and len(loads) == 4
    assert main(["chat", str(path), "--storage", store, "--adapter", "micro"]) == 2
    assert "--adapter: unknown model 'micro'; did you mean 'micro-chat'?" in capsys.readouterr().err
    assert len(loads) == 4
