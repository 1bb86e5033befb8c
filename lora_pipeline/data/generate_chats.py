"""Writes sample_chats.jsonl, the bundled conversation demo (OpenAI-style messages), the second source of
configs/tiny-mixture.yaml beside sample_instructions.json.

Tasks other than the instructions' (times tables, days of the week, comparing numbers, units of time,
spelling backwards), each asked as a user turn and answered in one sentence; about half go on with a
follow-up question in a second turn, so the mixture trains a conversational source and an Alpaca one
under one chat template. A tenth open with a system message. Deterministic: the same seed writes the same
file. Run `python -m lora_pipeline.data.generate_chats`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lora_pipeline.data.generate_sample import WORDS

OUTPUT = Path(__file__).with_name("sample_chats.jsonl")
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
UNITS = {"minutes": ("hours", 60), "seconds": ("minutes", 60), "hours": ("days", 24), "days": ("weeks", 7)}
SYSTEM = "You are a concise assistant. Answer in one sentence."


def _times(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    turns = [(f"What is {a} times {b}?", f"{a} times {b} is {a * b}.")]
    if rng.random() < 0.5:
        turns.append((f"And {a} times {b + 1}?", f"{a} times {b + 1} is {a * (b + 1)}."))
    return turns


def _days(rng: random.Random) -> list[tuple[str, str]]:
    index = rng.randrange(7)
    day, after, before = DAYS[index], DAYS[(index + 1) % 7], DAYS[index - 1]
    turns = [(f"What day comes after {day}?", f"{after} comes after {day}.")]
    if rng.random() < 0.5:
        turns.append((f"And the day before {day}?", f"{before} comes before {day}."))
    return turns


def _larger(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.sample(range(1, 100), 2)
    turns = [(f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.")]
    if rng.random() < 0.5:
        turns.append(("And which is smaller?", f"{min(a, b)} is smaller than {max(a, b)}."))
    return turns


def _units(rng: random.Random) -> list[tuple[str, str]]:
    small, (large, factor) = rng.choice(list(UNITS.items()))
    count = rng.randint(2, 9)
    turns = [(f"How many {small} are in {count} {large}?", f"There are {count * factor} {small} in {count} {large}.")]
    if rng.random() < 0.5:
        turns.append((f"And in {count + 1} {large}?", f"There are {(count + 1) * factor} {small} in {count + 1} {large}."))
    return turns


def _backwards(rng: random.Random) -> list[tuple[str, str]]:
    word = rng.choice(WORDS)
    return [(f"Spell the word {word} backwards.", f"{word} backwards is {word[::-1]}.")]


TASKS = [_times, _days, _larger, _units, _backwards]


def generate(rows: int = 320, seed: int = 11) -> list[dict]:
    """Conversations with distinct first questions (so no held-out one opens as a training one does), as many per
    task as it has questions up to an equal share; deterministic."""
    rng = random.Random(seed)
    seen: set[str] = set()
    result: list[dict] = []
    for task in TASKS * (rows // len(TASKS)):
        for _ in range(50):
            turns = task(rng)
            if turns[0][0] not in seen:
                break
        else:
            continue  # the task has no new question left
        seen.add(turns[0][0])
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.1 else []
        for question, answer in turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        result.append({"messages": messages})
    rng.shuffle(result)
    return result


if __name__ == "__main__":
    OUTPUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generate()), encoding="utf-8")
    print(f"wrote {OUTPUT}")
