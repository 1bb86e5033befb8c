"""Scores of one model, one row per held-out example: loss and token accuracy from a forward pass,
and its greedy answer scored against the reference. Dagster-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lora_pipeline.ml.batches import IGNORE_INDEX, example_batches, pad_id_of

if TYPE_CHECKING:
    import pandas as pd

    from lora_pipeline.ml.evaluation.suite import EvalSuite

FORWARD_METRICS = ("loss", "token_accuracy")


def forward_scores(model, frame: "pd.DataFrame", pad_id: int, batch_size: int) -> "pd.DataFrame":
    """Per example: summed and mean loss over its trained tokens, their count, and next-token accuracy.

    `frame` holds scorable rows only (see suite.scorable_rows), so batch rows map 1:1 onto it.
    """
    import pandas as pd
    import torch

    device = next(model.parameters()).device
    sums, counts, correct = [], [], []
    model.eval()
    with torch.no_grad():
        for batch in example_batches(frame, pad_id, batch_size):
            logits = model(input_ids=batch.input_ids.to(device),
                           attention_mask=batch.attention_mask.to(device)).logits.float()[:, :-1, :]
            targets = batch.labels[:, 1:].to(device)
            scored = targets != IGNORE_INDEX
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(targets.shape)
            sums += losses.sum(dim=1).tolist()
            counts += scored.sum(dim=1).tolist()
            correct += ((logits.argmax(-1) == targets) & scored).sum(dim=1).tolist()
    frame_out = pd.DataFrame({"loss_sum": sums, "tokens": counts, "correct": correct})
    frame_out["loss"] = frame_out["loss_sum"] / frame_out["tokens"]
    frame_out["token_accuracy"] = frame_out["correct"] / frame_out["tokens"]
    return frame_out


def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to prompts given as token ids (exactly as in training), batched with left padding."""
    import torch

    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    answers: list[str] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = [list(ids) for ids in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
            )
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in generated]
    return answers


def prompts_of(frame: "pd.DataFrame") -> list[list[int]]:
    """Each example's prompt tokens (everything before its first trained token; at least the first token,
    for rows trained on every token, such as plain text)."""
    return [list(ids[:max(int(length), 1)]) for ids, length in zip(frame["input_ids"], frame["prompt_tokens"])]


def score_model(model, tokenizer, suite: "EvalSuite", log: Callable[[str], None] | None = None,
                name: str = "model") -> "pd.DataFrame":
    """One row per example of the suite: example, loss, tokens, token_accuracy, answer and each text metric."""
    import time

    from lora_pipeline.ml.scoring.text import text_scores

    started = time.perf_counter()
    scores = forward_scores(model, suite.frame, pad_id_of(tokenizer), suite.batch_size)
    scores.insert(0, "example", range(len(scores)))
    text_metrics = [metric for metric in suite.metrics if metric not in FORWARD_METRICS]
    if suite.generates:
        answers = greedy_answers(model, tokenizer, prompts_of(suite.frame), suite.max_new_tokens, suite.batch_size)
        scores["answer"] = answers
        references = [text.strip() for text in suite.frame["completion"]]
        for metric, values in text_scores(answers, references, text_metrics).items():
            scores[metric] = values
    if log:
        log(f"{name}: {len(scores)} examples scored in {time.perf_counter() - started:.1f}s, loss "
            f"{scores['loss'].mean():.4f} (per-example mean)")
    return scores


def probe_losses(model, tokenizer, probe: "pd.DataFrame", batch_size: int) -> "pd.DataFrame":
    """Per passage of the general-text probe: its mean loss over every token."""
    return forward_scores(model, probe, pad_id_of(tokenizer), batch_size)[["loss_sum", "tokens", "loss"]]
