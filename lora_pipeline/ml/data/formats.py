"""The row formats users bring, their pandera schemas, detection, and conversion to chat messages.

Dagster-free. Formats:

- ``alpaca``: instruction, input (optional), output, system (optional)
- ``sharegpt``: conversations = [{from, value}] with from in human/gpt/system/function_call/
  observation/tool; optional system and tools columns
- ``messages``: messages = [{role, content}] (OpenAI style; content a string or a list of typed
  text and reasoning parts; assistant tool_calls and reasoning allowed); optional tools column

Reasoning arrives three ways, and each becomes the message's ``reasoning_content`` (the field
Hugging Face templates of thinking models read): a ``{"type": "reasoning"}`` (or ``thinking``)
content part, a ``reasoning_content`` / ``reasoning`` / ``thinking`` message field, or a
``<think>...</think>`` block that opens an assistant answer.
- ``prompt_completion``: prompt, completion
- ``text``: text
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.ml.preference.formats import OPTIONAL as PREFERENCE_OPTIONAL
from lora_pipeline.ml.preference.formats import PREFERENCE_FORMATS, detect_preference, label_problem, turns_problem
from lora_pipeline.ml.preference.formats import REQUIRED as PREFERENCE_REQUIRED
from lora_pipeline.ml.preference.formats import preference_schema_columns

SFT_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS
REQUIRED_COLUMNS = {
    **PREFERENCE_REQUIRED,
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL_COLUMNS = {
    **PREFERENCE_OPTIONAL,
    "alpaca": ("input", "system"),
    "sharegpt": ("system", "tools"),
    "messages": ("tools",),
    "prompt_completion": ("system",),
    "text": (),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


# --- detection ------------------------------------------------------------------------------------

def detect_format(frame: pd.DataFrame, source: str) -> str:
    """The format the columns (and, for conversations, the first row's keys) say the rows are in."""
    columns = set(frame.columns)
    if (preference := detect_preference(columns)) is not None:  # before 'conversations': ShareGPT pairs have one
        return preference
    for column in ("conversations", "messages"):
        if column in columns:
            first = _first_list_item(frame[column])
            if isinstance(first, dict) and "from" in first and "value" in first:
                return "sharegpt"
            if isinstance(first, dict) and "role" in first:
                return "messages"
            return "sharegpt" if column == "conversations" else "messages"
    for fmt in ("alpaca", "prompt_completion", "text"):
        if set(REQUIRED_COLUMNS[fmt]) <= columns:
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(REQUIRED_COLUMNS[fmt])}" for fmt in FORMATS)
    raise DataError(
        f"{source}: cannot tell the format from the columns {', '.join(map(str, frame.columns))} "
        f"(expected one of {expected}); set dataset.format, or map your columns with dataset.columns"
    )


def with_format_columns(frame: pd.DataFrame, fmt: str) -> pd.DataFrame:
    """The rows with a conversation column under the name its format uses.

    Exports mix the names: ShareGPT turns under 'messages' (LLaMA-Factory), role/content
    messages under 'conversations'.
    """
    wanted = {"sharegpt": "conversations", "messages": "messages"}.get(fmt)
    other = {"conversations": "messages", "messages": "conversations"}.get(wanted or "")
    if wanted and wanted not in frame.columns and other in frame.columns:
        return frame.rename(columns={other: wanted})
    return frame


def _first_list_item(column: pd.Series) -> Any:
    for value in column.head(20):
        value = _maybe_json(value)
        if isinstance(value, list) and value:
            return value[0]
    return None


def _maybe_json(value: Any) -> Any:
    """Nested columns arrive as JSON text from CSV and from our own Parquet: parse them."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# --- element problems (one sentence each, used by the pandera checks and the error message) -------

def _string_problem(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, found {type(value).__name__}"


def _tools_problem(value: Any) -> str | None:
    value = _maybe_json(value)
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        return "must be a list of tool (function) schemas, as objects or JSON text"
    return None


def sharegpt_problem(value: Any, flag_field: str | None = None) -> str | None:
    """Why a ShareGPT conversation is malformed, or None (flag_field: dataset.turn_flag_field)."""
    value = _maybe_json(value)
    if not isinstance(value, list):
        return f"must be a list of {{from, value}} turns, found {type(value).__name__}"
    if not value:
        return None  # an empty conversation is cleaned away (counted), not a format error
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            return f"turn {index}: must be an object with from and value, found {type(turn).__name__}"
        if "from" not in turn or "value" not in turn:
            return f"turn {index}: needs 'from' and 'value' (found {', '.join(turn) or 'nothing'})"
        if turn["from"] not in SHAREGPT_ROLES:
            return (f"turn {index}: unknown role {turn['from']!r} in 'from' "
                    f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(turn["value"], str):
            return f"turn {index}: 'value' must be a string, found {type(turn['value']).__name__}"
        if (problem := _turn_flag_problem(turn, flag_field)) is not None:
            return f"turn {index}: {problem}"
    return None


def messages_problem(value: Any, flag_field: str | None = None) -> str | None:
    """Why an OpenAI-style messages list is malformed, or None (flag_field: dataset.turn_flag_field)."""
    value = _maybe_json(value)
    if not isinstance(value, list):
        return f"must be a list of {{role, content}} messages, found {type(value).__name__}"
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {index}: must be an object with role and content, found {type(message).__name__}"
        if "role" not in message:
            return f"message {index}: needs 'role' (found {', '.join(message) or 'nothing'})"
        if message["role"] not in MESSAGE_ROLES:
            return f"message {index}: unknown role {message['role']!r} (expected one of {', '.join(MESSAGE_ROLES)})"
        content = message.get("content")
        if content is None:
            if message["role"] == "assistant" and message.get("tool_calls"):
                continue
            return f"message {index}: needs 'content'"
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                if (problem := _content_part_problem(part)) is not None:
                    return f"message {index}: content part {part_index}: {problem}"
        elif not isinstance(content, str):
            return (f"message {index}: 'content' must be a string or a list of text and reasoning parts, "
                    f"found {type(content).__name__}")
        if "tool_calls" in message and message["tool_calls"] is not None and not isinstance(message["tool_calls"], list):
            return f"message {index}: 'tool_calls' must be a list"
        if (problem := _turn_flag_problem(message, flag_field)) is not None:
            return f"message {index}: {problem}"
    return None


REASONING_PARTS = ("reasoning", "thinking")  # content part types that carry a model's reasoning
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # message fields that do, in the order looked for
REASONING = "reasoning_content"  # where converted messages carry it: the field HF templates of thinking models read
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _content_part_problem(part: Any) -> str | None:
    """Why a content part is neither text nor reasoning, or None: parts carry their text as 'text' or
    'value' (reasoning parts also as 'reasoning' or 'thinking'), or are plain strings."""
    if isinstance(part, str):
        return None
    if not isinstance(part, dict):
        return f"must be text or an object with type and text, found {type(part).__name__}"
    kind = part.get("type", "text")
    if kind not in ("text", *REASONING_PARTS):
        return f"its type is {kind!r}: only text and reasoning parts are supported"
    if not isinstance(_part_text(part), str):
        return f"a {kind} part needs its text as 'text' or 'value' (a string)"
    return None


def _part_text(part: Any) -> Any:
    if isinstance(part, str):
        return part
    for key in ("text", "value", *REASONING_PARTS):
        if part.get(key) is not None:
            return part[key]
    return None


def _is_reasoning_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in REASONING_PARTS


# --- per-turn training flags ----------------------------------------------------------------------

TURN_FLAG_FIELDS = ("loss_weight", "train", "weight")  # as other tools write it, in the order looked for
LEARN = "learn"  # the key converted messages carry their flag under: True learned, False context only


def turn_flag(message: dict, field: str | None = None) -> bool | None:
    """Whether a message is learned (True) or only context (False) by its flag field; None when it has none.

    field: the configured flag field; by default the first of TURN_FLAG_FIELDS the message carries.
    Raises ValueError naming the field when the value is not 0/1 or true/false.
    """
    for name in (field,) if field else TURN_FLAG_FIELDS:
        value = message.get(name)
        if value is None:
            continue
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
            return value.strip().lower() in ("1", "true")
        raise ValueError(f"'{name}' must be 0 or 1 (or true/false), found {value!r}")
    return None


def _turn_flag_problem(message: dict, flag_field: str | None = None) -> str | None:
    # With a configured field only that one is a flag: another tool's 'weight' may mean something else.
    try:
        turn_flag(message, flag_field)
    except ValueError as exc:
        return str(exc)
    return None


# --- pandera schemas ------------------------------------------------------------------------------

def _column(problem: Callable[[Any], str | None], label: str, required: bool = True):
    import pandera.pandas as pa

    def valid(series: pd.Series) -> pd.Series:
        if problem is _string_problem and isinstance(series.dtype, pd.StringDtype):
            return pd.Series(True, index=series.index)  # a string column holds strings (or nulls) only
        return series.map(lambda value: value is None or value != value or problem(value) is None)

    return pa.Column(
        checks=pa.Check(valid, error=label),
        nullable=not required,
        required=required,
        coerce=False,
    )


def raw_schema(fmt: str, flag_field: str | None = None):
    """The pandera schema rows of a format must satisfy (flag_field: dataset.turn_flag_field)."""
    import pandera.pandas as pa

    string = _string_problem
    turns = functools.partial(sharegpt_problem, flag_field=flag_field)
    chat = functools.partial(messages_problem, flag_field=flag_field)
    columns = {
        "alpaca": {"instruction": _column(string, "string"), "output": _column(string, "string"),
                   "input": _column(string, "string", required=False),
                   "system": _column(string, "string", required=False)},
        "sharegpt": {"conversations": _column(turns, "sharegpt_turns"),
                     "system": _column(string, "string", required=False),
                     "tools": _column(_tools_problem, "tool_schemas", required=False)},
        "messages": {"messages": _column(chat, "chat_messages"),
                     "tools": _column(_tools_problem, "tool_schemas", required=False)},
        "prompt_completion": {"prompt": _column(string, "string"), "completion": _column(string, "string"),
                              "system": _column(string, "string", required=False)},
        "text": {"text": _column(string, "string")},
    }.get(fmt) or preference_schema_columns(fmt, _column)
    return pa.DataFrameSchema(columns, name=f"raw_{fmt}", strict=False)


_PROBLEMS = {"string": _string_problem, "sharegpt_turns": sharegpt_problem, "chat_messages": messages_problem,
             "tool_schemas": _tools_problem, "turns": turns_problem, "kto_label": label_problem}


def validate_rows(frame: pd.DataFrame, fmt: str, where: Callable[[int], str], source: str,
                  flag_field: str | None = None) -> None:
    """Check the rows against the format's pandera schema; raise one DataError naming the first problem.

    flag_field: dataset.turn_flag_field, the only per-turn flag field then checked."""
    import pandera.pandas as pa

    if fmt not in FORMATS:
        raise DataError(f"{source}: unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    try:
        raw_schema(fmt, flag_field).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        raise DataError(describe_failures(errors.failure_cases, frame, fmt, where, source, flag_field)) from None


def describe_failures(failures: pd.DataFrame, frame: pd.DataFrame, fmt: str, where: Callable[[int], str],
                      source: str, flag_field: str | None = None) -> str:
    """One line for the first of pandera's failure cases, plus how many more there are."""
    expected = ", ".join(REQUIRED_COLUMNS[fmt])
    optional = ", ".join(OPTIONAL_COLUMNS[fmt])
    found = ", ".join(map(str, frame.columns))
    missing = failures[failures["check"] == "column_in_dataframe"]
    if len(missing):
        names = ", ".join(repr(name) for name in missing["failure_case"])
        return (f"{source}: missing column {names} ({fmt} rows need {expected}"
                f"{'; optional ' + optional if optional else ''}; found {found}); rename the columns or map "
                "them with dataset.columns")
    failures = failures.assign(_row=pd.to_numeric(failures["index"], errors="coerce")).sort_values("_row")
    first = failures.iloc[0]
    row = int(first["_row"])
    column = first["column"]
    if first["check"] == "not_nullable":
        detail = f"missing field '{column}' ({fmt} rows need {expected}; found {found})"
    else:
        problem_of = _PROBLEMS.get(str(first["check"]), _string_problem)
        if problem_of in (sharegpt_problem, messages_problem):
            problem_of = functools.partial(problem_of, flag_field=flag_field)
        problem = problem_of(frame[column].iloc[row])
        detail = f"field '{column}' {problem or 'is invalid'}"
    more = len(failures) - 1
    return f"{where(row)}: {detail}" + (f" ({more} more problem{'s' if more > 1 else ''} in other rows)" if more else "")


# --- conversion to chat messages ------------------------------------------------------------------

def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(_part_text(part) for part in content if not _is_reasoning_part(part))
    return content or ""


def _reasoning_of(message: dict, content: str) -> tuple[str | None, str]:
    """The message's reasoning (from its reasoning parts, a reasoning field or a leading think block) and
    its content without a think block; (None, content) when it has none."""
    parts = message.get("content")
    if isinstance(parts, list) and any(_is_reasoning_part(part) for part in parts):
        return "".join(_part_text(part) for part in parts if _is_reasoning_part(part)), content
    for name in REASONING_FIELDS:
        if isinstance(message.get(name), str):
            return message[name], content
    return split_think(content)


def split_think(content: str) -> tuple[str | None, str]:
    """A leading <think>...</think> block split off an answer: (reasoning, answer), or (None, content)."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN) or THINK_CLOSE not in stripped:
        return None, content
    reasoning, answer = stripped[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    return reasoning.strip("\n"), answer.lstrip("\n")


def _tool_call_from(value: str) -> dict | None:
    """A ShareGPT function_call value ({"name", "arguments"} JSON) as an OpenAI tool call."""
    parsed = _maybe_json(value)
    if isinstance(parsed, dict) and "name" in parsed:
        arguments = parsed.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _maybe_json(arguments)
        return {"type": "function", "function": {"name": parsed["name"], "arguments": arguments}}
    return None


def sharegpt_messages(turns: Any, system: Any = None, flag_field: str | None = None) -> list[dict]:
    """ShareGPT turns as role/content messages; function_call turns become assistant tool calls; turn flags kept."""
    messages = []
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for turn in _maybe_json(turns):
        role = SHAREGPT_ROLES[turn["from"]]
        if turn["from"] == "function_call" and (call := _tool_call_from(turn["value"])) is not None:
            converted = {"role": "assistant", "content": "", "tool_calls": [call]}
        else:
            converted = {"role": role, "content": turn["value"]}
            if role == "assistant":
                _add_reasoning(converted, turn)
        messages.append(_with_flag(converted, turn, flag_field))
    return messages


def openai_messages(messages: Any, flag_field: str | None = None) -> list[dict]:
    """Messages with content flattened to a string; tool calls and turn flags kept."""
    result = []
    for message in _maybe_json(messages):
        converted = {"role": message["role"], "content": _text_of(message.get("content"))}
        if message.get("tool_calls"):
            converted["tool_calls"] = [_plain_tool_call(call) for call in message["tool_calls"]]
        if message.get("name"):
            converted["name"] = message["name"]
        if message["role"] == "assistant":
            _add_reasoning(converted, message)
        result.append(_with_flag(converted, message, flag_field))
    return result


def _add_reasoning(converted: dict, original: dict) -> None:
    reasoning, content = _reasoning_of(original, converted["content"])
    if reasoning is not None:
        converted["content"] = content
        converted[REASONING] = reasoning


def _with_flag(converted: dict, original: dict, flag_field: str | None) -> dict:
    flag = turn_flag(original, flag_field)
    if flag is not None:
        converted[LEARN] = flag
    return converted


def _plain_tool_call(call: dict) -> dict:
    function = dict(call.get("function", call))
    if isinstance(function.get("arguments"), str):
        function["arguments"] = _maybe_json(function["arguments"])
    return {"type": "function", "function": function}


def conversations_of(frame: pd.DataFrame, fmt: str, system_prompt: str | None, flag_field: str | None = None,
                     where: Callable[[int], str] | None = None) -> list[list[dict]]:
    """Every row as a chat, whatever its format (text rows excepted), with the default system prompt added.

    Messages that carry a per-turn training flag (flag_field, or the usual fields) have it under LEARN.
    A flag that is not 0/1 or true/false is a DataError naming the row (where) and the field.
    """
    if fmt == "sharegpt":
        systems = frame["system"] if "system" in frame.columns else [None] * len(frame)
        chats = _each_row(lambda row: sharegpt_messages(*row, flag_field=flag_field),
                          zip(frame["conversations"], systems), where)
    elif fmt == "messages":
        chats = _each_row(lambda row: openai_messages(row, flag_field=flag_field), frame["messages"], where)
    elif fmt == "alpaca":
        inputs = frame["input"] if "input" in frame.columns else [""] * len(frame)
        systems = frame["system"] if "system" in frame.columns else [None] * len(frame)
        chats = [
            ([{"role": "system", "content": s}] if isinstance(s, str) and s.strip() else [])
            + [{"role": "user", "content": i + ("\n\n" + x if isinstance(x, str) and x.strip() else "")},
               {"role": "assistant", "content": o}]
            for i, x, o, s in zip(frame["instruction"], inputs, frame["output"], systems)
        ]
    elif fmt == "prompt_completion":
        systems = frame["system"] if "system" in frame.columns else [None] * len(frame)
        chats = [
            ([{"role": "system", "content": s}] if isinstance(s, str) and s.strip() else [])
            + [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            for p, c, s in zip(frame["prompt"], frame["completion"], systems)
        ]
    else:
        raise DataError(f"format {fmt!r} has no turns to put in a chat template; use template 'plain'")
    if system_prompt:
        chats = [chat if chat and chat[0]["role"] == "system" else [{"role": "system", "content": system_prompt}] + chat
                 for chat in chats]
    return chats


def _each_row(convert: Callable[[Any], list[dict]], rows, where: Callable[[int], str] | None) -> list[list[dict]]:
    chats = []
    for index, row in enumerate(rows):
        try:
            chats.append(convert(row))
        except ValueError as exc:  # a turn flag's value
            raise DataError(f"{where(index) if where else f'row {index}'}: {exc}") from None
    return chats


def tools_of(frame: pd.DataFrame) -> list[list[dict] | None]:
    """Each row's tool schemas, if the rows have a tools column."""
    if "tools" not in frame.columns:
        return [None] * len(frame)
    tools = []
    for value in frame["tools"]:
        parsed = _maybe_json(value)
        tools.append(parsed if isinstance(parsed, list) and parsed else None)
    return tools


def storable(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The rows with nested values as JSON text, so one Parquet column type holds them all."""
    nested = []
    stored = frame.copy()
    for column in stored.columns:
        values = stored[column]
        if values.dtype == object and values.map(lambda v: isinstance(v, (list, dict))).any():
            stored[column] = values.map(
                lambda v: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
            )
            nested.append(str(column))
    return stored, nested
