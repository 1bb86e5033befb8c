"""The preference row formats, as raw_dataset detects and checks them (ml/data/formats.py holds the SFT ones).

- 'preference': pairs. `chosen` and `rejected` (each text, a message, a list of messages or a Human/Assistant
  transcript), with the prompt in `prompt`, in ShareGPT `conversations`, in Alpaca `instruction` (and `input`),
  or as the shared start of two whole conversations.
- 'kto': unpaired rows, `prompt` / `completion` / `label` (true: a desirable completion), as KTO trains on.

The checks here are per field (its type); what needs the whole row (chosen differs from rejected, a prompt
exists) is checked where the pair is built (data.py), with the same row and field named.
"""

from __future__ import annotations

from typing import Any

PREFERENCE_FORMATS = ("preference", "kto")
REQUIRED = {"preference": ("chosen", "rejected"), "kto": ("prompt", "completion", "label")}
OPTIONAL = {"preference": ("prompt", "conversations", "instruction", "input", "system"), "kto": ("system",)}
LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def detect_preference(columns: set) -> str | None:
    """'preference' or 'kto' when the columns say so, else None (the SFT formats are tried next)."""
    if set(REQUIRED["preference"]) <= columns:
        return "preference"
    if set(REQUIRED["kto"]) <= columns:
        return "kto"
    return None


def turns_problem(value: Any) -> str | None:
    """Why a prompt or answer field is not text, a message or a list of messages, or None."""
    from lora_pipeline.ml.data.formats import _maybe_json

    value = _maybe_json(value)
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        return "is an empty list"
    for item in items:
        if isinstance(item, str):
            continue
        if isinstance(item, dict) and ({"role", "content"} <= set(item) or {"from", "value"} <= set(item)):
            continue
        return ("must be text, a {role, content} (or {from, value}) message or a list of them, found "
                f"{type(item).__name__}" + (f" with keys {', '.join(map(str, item))}" if isinstance(item, dict) else ""))
    return None


def label_of(value: Any) -> bool | None:
    """A KTO label as a bool (true, 1, 'yes' ... desirable), or None when it is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return LABEL_WORDS.get(value.strip().lower())
    return None


def label_problem(value: Any) -> str | None:
    """Why a KTO label is not one, or None."""
    return None if label_of(value) is not None else f"must be true or false (or 1/0), found {value!r}"


def preference_schema_columns(fmt: str, column) -> dict:
    """The pandera columns of a preference format; column(problem, label, required) makes one."""
    if fmt == "preference":
        return {"chosen": column(turns_problem, "turns"), "rejected": column(turns_problem, "turns"),
                "prompt": column(turns_problem, "turns", required=False),
                "conversations": column(turns_problem, "turns", required=False)}
    return {"prompt": column(turns_problem, "turns"), "completion": column(turns_problem, "turns"),
            "label": column(label_problem, "kto_label")}
