"""Held-out metrics and generation samples for a causal LM. Dagster-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_pipeline.ml.batches import IGNORE_INDEX, Batch, example_batches, pad_id_of
from lora_pipeline.ml.base.loading import load_full_precision

if TYPE_CHECKING:
    import pandas as pd

    from lora_pipeline.ml.base.precision import DeviceInfo

def completion_metrics(model, batches: list[Batch]) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy over the completion tokens."""
    import torch

    device = next(model.parameters()).device
    total_loss = 0.0
    total_tokens = 0
    correct = 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
            ).logits.float()
            shifted_logits = logits[:, :-1, :]
            targets = batch.labels[:, 1:].to(device)
            scored = targets != IGNORE_INDEX
            losses = torch.nn.functional.cross_entropy(
                shifted_logits.reshape(-1, shifted_logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_loss += float(losses)
            total_tokens += int(scored.sum())
            correct += int(((shifted_logits.argmax(-1) == targets) & scored).sum())
    loss = total_loss / max(total_tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": correct / max(total_tokens, 1),
        "tokens": total_tokens,
    }


def generate_answers(model, tokenizer, prompts: list, max_new_tokens: int) -> list[str]:
    """Greedy answers to each prompt (token ids, exactly as in training), decoded without special tokens."""
    import torch

    device = next(model.parameters()).device
    answers = []
    model.eval()
    with torch.no_grad():
        for prompt_ids in prompts:
            input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id_of(tokenizer),
            )
            new_tokens = generated[0, input_ids.shape[1] :]
            answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


def sample_rows(eval_frame: "pd.DataFrame", count: int) -> "pd.DataFrame":
    """Held-out rows to answer in the report: ones with a prompt, one per distinct task line first."""
    import pandas as pd

    answerable = eval_frame[(eval_frame["prompt_tokens"] > 0) & (eval_frame["prompt_tokens"] < eval_frame["tokens"])]
    task_lines = answerable["prompt"].str.split("\n").str[1].fillna(answerable["prompt"])
    distinct = answerable.loc[task_lines.drop_duplicates().index]
    return pd.concat([distinct, answerable.drop(distinct.index)]).head(count)


@dataclass
class EvaluationResult:
    """Metrics per model (base, adapter, merged, optionally merged_into_original) and generation samples."""

    metrics: dict[str, dict[str, float]]
    samples: list[dict[str, str]]
    examples: int


def evaluate_pipeline(
    quantized_dir,
    adapter_dir,
    merged_dir,
    eval_frame: "pd.DataFrame",
    batch_size: int,
    sample_count: int,
    max_new_tokens: int,
    device: "DeviceInfo",
    original_dir=None,
    log=None,
    trust_remote_code: bool = False,
) -> EvaluationResult:
    """Compare the base, the base with the adapter and the merged model on held-out examples.

    With original_dir, a merge into those (unquantized) weights is evaluated too, in memory, so
    the report shows what merging into the original weights would cost.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.base.precision import device_map_for

    log = log or (lambda message: None)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    batches = example_batches(eval_frame, pad_id_of(tokenizer), batch_size)
    samples_frame = sample_rows(eval_frame, sample_count)
    prompts = [ids[:length] for ids, length in zip(samples_frame["input_ids"], samples_frame["prompt_tokens"])]
    metrics: dict[str, dict[str, float]] = {}
    answers: dict[str, list[str]] = {}

    def measure(name: str, model) -> None:
        metrics[name] = completion_metrics(model, batches)
        answers[name] = generate_answers(model, tokenizer, prompts, max_new_tokens)
        log(f"{name}: held-out loss {metrics[name]['loss']:.4f}, token accuracy {metrics[name]['token_accuracy']:.3f}")

    placement = device_map_for(device)
    base = AutoModelForCausalLM.from_pretrained(quantized_dir, device_map=placement, trust_remote_code=trust_remote_code)
    measure("base", base)
    measure("adapter", PeftModel.from_pretrained(base, adapter_dir))
    del base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, device_map=placement, trust_remote_code=trust_remote_code)
    measure("merged", merged)
    if original_dir is not None:
        merged_original = PeftModel.from_pretrained(load_full_precision(original_dir, trust_remote_code), adapter_dir).merge_and_unload()
        measure("merged_into_original", merged_original.to(device.device))
    samples = [
        {"prompt": prompt, "reference": reference, **{name: answers[name][i] for name in answers}}
        for i, (prompt, reference) in enumerate(zip(samples_frame["prompt"], samples_frame["completion"]))
    ]
    return EvaluationResult(metrics=metrics, samples=samples, examples=len(eval_frame))
