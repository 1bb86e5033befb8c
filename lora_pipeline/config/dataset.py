"""The dataset section of a model config: where the training data comes from (one source, or a mixture of
several: mixture.py), what shape its rows have, and how they are templated, cleaned and split."""

from __future__ import annotations

from typing import Literal, Optional

import pydantic
from pydantic import Field

from lora_pipeline.config.base import StrictSection
from lora_pipeline.config.mixture import DataFormat, DataSource, MixedSource, mixed_sources

# Dataset keys that only a mixture (dataset.sources) reads.
ONE_SOURCE_UNUSED = ("sources", "mix_seed")


class DatasetSettings(StrictSection):
    """Where the training data comes from, what shape its rows have, how they are templated, cleaned and split."""

    source: Optional[str] = Field(
        default=None,
        description="The data: a local JSON, JSONL, CSV, Parquet or TXT file, a folder or glob of them "
        "(relative paths are resolved against the working directory), a folder written by datasets' "
        "save_to_disk, any fsspec URL (s3://bucket/train.jsonl, s3://bucket/prefix/), or a Hugging "
        "Face hub dataset as 'hf:owner/name' (a bare 'owner/name' that is not a local path works too). "
        "Give this or dataset.sources, not both.",
    )
    sources: Optional[list[DataSource]] = Field(
        default=None,
        description="Instead of dataset.source: several datasets mixed into one training set. Each entry has its "
        "own source and, when it differs from the dataset-level key, its own format, columns, split, subset, "
        "revision, system_prompt and max_rows, plus a name and a weight (or train_rows) saying how much of it "
        "is trained on. Each source is read, checked, cleaned and split on its own (raw rows of a source whose "
        "data and read settings are unchanged are reused, not read again), then its training rows are sampled "
        "or repeated by its weight; the formatted splits are one table with a 'source' column, and the "
        "metadata shows each source's rows and tokens before and after mixing.",
    )
    mix_seed: int = Field(
        default=0,
        description="With dataset.sources: the seed of the draw that samples and repeats the sources' training "
        "rows (and orders the mixed training split). The same seed, config and data give the same mixture.",
    )
    format: DataFormat = Field(
        default="auto",
        description="Row format. 'auto' detects it from the columns and records which. 'alpaca': "
        "instruction, input (optional), output, system (optional). 'sharegpt': conversations = "
        "[{from, value}] with from human/gpt/system/function_call/observation/tool. 'messages': "
        "OpenAI-style [{role, content}], content a string or a list of text and reasoning parts. "
        "'prompt_completion': prompt, completion. 'text': text (a TXT file gives one row per line). "
        "For preference tuning (training.objective dpo, kto, orpo): 'preference': chosen and rejected (text, a "
        "message or a conversation each), the prompt in 'prompt', in ShareGPT 'conversations', or the two "
        "conversations' shared start; 'kto': unpaired prompt, completion, label (true: desirable).",
    )
    columns: dict[str, str] = Field(
        default={},
        description="Column mapping for data whose columns have other names: the format's column "
        "name to the data's, e.g. {instruction: question, output: answer}.",
    )
    split: str = Field(
        default="train", description="Split to read from a hub dataset or a save_to_disk DatasetDict."
    )
    subset: Optional[str] = Field(
        default=None, description="Hub dataset configuration (subset) name, if it has several."
    )
    revision: Optional[str] = Field(
        default=None, description="Hub dataset revision (branch, tag or commit) to read."
    )
    template: str = Field(
        default="auto",
        description="How rows become text. 'auto': the alpaca template for alpaca rows, plain "
        "concatenation for prompt_completion and text, and for conversations the tokenizer's own "
        "chat template, or ChatML when it has none. Named: 'alpaca', 'chatml', 'tokenizer', 'plain'. "
        "Anything containing '{{' or '{%' is used as an inline Jinja chat template.",
    )
    system_prompt: Optional[str] = Field(
        default=None,
        description="System prompt added to every example that has none of its own.",
    )
    turn_flag_field: Optional[str] = Field(
        default=None,
        description="The message field that says whether a conversation turn is learned (1 or true) or only "
        "context (0 or false), as other tools write it. By default the first of 'loss_weight', 'train' and "
        "'weight' a message carries; turns without one follow the usual rule (every assistant turn is "
        "learned). Applies while training.completion_only_loss is on.",
    )
    turns: Literal["auto", "conversation", "per_turn"] = Field(
        default="auto",
        description="How a conversation with several learned turns is trained. 'conversation': one sequence, "
        "every learned turn in it; right when the template renders history as it renders the last turn "
        "(ChatML, Llama 3). 'per_turn': one example per learned turn, the history before it rendered as "
        "the template renders history; what inference sees with templates that render the last answer "
        "differently (Qwen3 and DeepSeek-R1 style thinking templates drop earlier reasoning). 'auto': "
        "one sequence where the template allows it, per turn for the rows where it does not. The "
        "formatted_dataset metadata says how many rows were split and what it cost in tokens.",
    )
    reasoning: Literal["auto", "inline", "drop"] = Field(
        default="auto",
        description="Reasoning in the data (a 'reasoning' content part, a reasoning_content / reasoning / "
        "thinking message field, or a <think>...</think> block opening an answer) is learned with its answer. "
        "'auto': handed to templates that render reasoning_content (Qwen3's), written inline as a "
        "<think>...</think> block before the answer for those that do not. 'inline': always inline. "
        "'drop': left out.",
    )
    unrenderable: Literal["refuse", "drop"] = Field(
        default="refuse",
        description="A row the chat template cannot render (a role it refuses, as Gemma 3 refuses tool "
        "turns; tool calls it leaves out): 'refuse' stops with the row, the reason and the fix; 'drop' "
        "leaves such rows out and counts them, up to dataset.max_unrenderable_rate.",
    )
    max_unrenderable_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="With dataset.unrenderable: drop, the largest share of rows that may be dropped; above "
        "it formatting stops, naming the first dropped row and why.",
    )
    dedupe: Literal["normalized", "exact", "none"] = Field(
        default="normalized",
        description="Duplicate removal: 'normalized' drops exact duplicates and rows equal up to case "
        "and whitespace; 'exact' only identical rows; 'none' keeps them (they still never straddle "
        "the train/eval split).",
    )
    overlong: Literal["auto", "truncate", "drop", "split"] = Field(
        default="auto",
        description="Examples longer than training.max_length tokens (counted with the real tokenizer): "
        "'truncate' keeps their first max_length tokens, 'drop' removes them, 'split' cuts them into "
        "max_length blocks (each led by BOS where the tokenizer uses one, EOS only at the document's "
        "end), so nothing is lost: the continued-pretraining way. 'auto': split for the text format, "
        "truncate for the others. An example left with no response tokens is removed, and every "
        "count is recorded.",
    )
    max_truncation_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Largest share of examples that may exceed training.max_length; above it the "
        "formatted_dataset check fails and training does not start (raise max_length or clean the data).",
    )
    eval_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Share of rows held out for evaluation. Rows are assigned by a hash of their "
        "normalised content, so the split is stable across runs and duplicates never straddle it.",
    )
    max_rows: Optional[int] = Field(
        default=None,
        ge=1,
        description="Use at most this many rows of the source (the first ones), e.g. for a smoke test; with "
        "dataset.sources, of each source that sets no max_rows of its own.",
    )
    follow_symlinks: bool = Field(
        default=False,
        description="Read files that symlinks in a local source lead to outside the source's folder (its "
        "folder, a glob's folder, or a file's folder). Off: such a link is refused, naming it, so a link to a "
        "file elsewhere (/etc/passwd) is never read as rows. Links that stay inside the folder are followed.",
    )

    @pydantic.model_validator(mode="after")
    def _one_source_or_a_mixture(self) -> "DatasetSettings":
        if self.source is None and self.sources is None:
            raise ValueError("missing key 'dataset.source' (one dataset), or give dataset.sources (several, mixed)")
        if self.source is not None and self.sources is not None:
            raise ValueError("give dataset.source (one dataset) or dataset.sources (several, mixed), not both")
        if self.sources is not None:
            if not self.sources:
                raise ValueError("dataset.sources is empty: list at least one source, or give dataset.source")
            mixed_sources(self)  # distinct names
        return self

    @property
    def mixture(self) -> list[MixedSource]:
        """dataset.sources, each with the dataset-level defaults filled in (empty for a one-source dataset)."""
        return mixed_sources(self)

    @property
    def source_label(self) -> str:
        """The data in words, for logs, cards and errors: the source, or the mixture's sources joined by ' + '."""
        return self.source if self.source is not None else " + ".join(entry.source for entry in self.sources or [])
