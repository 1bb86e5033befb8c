"""Writes sample_preferences.json, the bundled preference demo (prompt / chosen / rejected).

It is the DPO counterpart of sample_instructions.json and is built from it: the same eight small tasks,
asked the same way (generate_sample.py's own task functions make every prompt and its chosen answer, so the
chosen answer is exactly what the SFT demo teaches), and the same words, so the built-in tokenizer, trained
on the SFT demo, spells every pair with its own tokens. The prompt is the instruction, with the input (when
there is one) on the next line; a chat template renders it as the user's message.

The rejected answer is a wrong answer of the same shape (the same sentence, one wrong piece), and wrong in a
way that a tiny model can spot in prompts it was not trained on, so that DPO from the SFT demo's adapter
visibly moves held-out pairs within a couple of minutes on a CPU:
- a word echoed where it should change: the opposite that repeats the word, casing left as it was, a sort
  that gives the numbers back in their order, a sequence that starts over;
- a rule misapplied: a plural over-regularized ("mouses") or left unchanged ("cat"), the numbers sorted the
  wrong way, the wrong operation (plus instead of minus);
- a near miss: a letter count off by one or two, a sequence with the wrong step or stuck on its last number,
  the capital of another country in the list, the opposite of another word.
A prompt can have several pairs, each with another wrong answer; none has chosen equal to rejected.
Deterministic: the same seed writes the same file. Run `python -m lora_pipeline.data.generate_preferences`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lora_pipeline.data.generate_sample import (
    CAPITALS, OPPOSITES, _arithmetic, _capital, _count, _letters, _opposite, _plural, _sort, _uppercase,
)

OUTPUT = Path(__file__).with_name("sample_preferences.json")


def prompt_of(row: dict) -> str:
    """The instruction, with the input on the next line when there is one."""
    return f"{row['instruction']}\n{row['input']}" if row["input"] else row["instruction"]


def _numbers(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", text)]


def _listed(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


def _wrong_arithmetic(row: dict, rng: random.Random) -> tuple[str, str]:
    """The other operation done instead ("What is 9 minus 4?" answered "9 plus 4 is 13.")."""
    a, b, _ = _numbers(row["output"])
    if " plus " in row["output"]:
        a, b = max(a, b), min(a, b)
        return "operation", f"{a} minus {b} is {a - b}."
    return "operation", f"{a} plus {b} is {a + b}."


def _wrong_capital(row: dict, rng: random.Random) -> tuple[str, str]:
    """A country where the capital belongs: the country itself, or another one."""
    country = re.fullmatch(r"The capital of (.+) is .+\.", row["output"]).group(1)
    if rng.random() < 0.4:
        return "echo", f"The capital of {country} is {country}."
    other = rng.choice([name for name in CAPITALS if name != country])
    return "country", f"The capital of {country} is {other}."


def _wrong_opposite(row: dict, rng: random.Random) -> tuple[str, str]:
    """The word itself, or the pair turned around (the opposite said to be the word)."""
    word = re.fullmatch(r"The opposite of (.+) is .+\.", row["output"]).group(1)
    if rng.random() < 0.5:
        return "echo", f"The opposite of {word} is {word}."
    return "swapped", f"The opposite of {OPPOSITES[word]} is {word}."


def _wrong_plural(row: dict, rng: random.Random) -> tuple[str, str]:
    """An 's' added to an irregular word ("mouses"), or the word unchanged."""
    word, plural = re.fullmatch(r"The plural of (.+) is (.+)\.", row["output"]).groups()
    naive = word + "s"
    if naive == plural or rng.random() < 0.3:
        return "unchanged", f"The plural of {word} is {word}."
    return "regularized", f"The plural of {word} is {naive}."


def _wrong_sort(row: dict, rng: random.Random) -> tuple[str, str]:
    """The numbers as they came, or largest first."""
    given = _numbers(row["input"])
    if given != sorted(given) and rng.random() < 0.6:
        return "echo", _listed(given)
    return "reversed", _listed(sorted(given, reverse=True))


def _wrong_casing(row: dict, rng: random.Random) -> tuple[str, str]:
    """The word left as it was given."""
    return ("left lowercase" if row["input"].islower() else "left capitals"), row["input"]


def _wrong_count(row: dict, rng: random.Random) -> tuple[str, str]:
    """The shown numbers again, or the last one repeated."""
    shown = _numbers(row["input"])
    if rng.random() < 0.5:
        return "echo", _listed(shown)
    return "stuck", _listed([shown[-1]] * 3)


def _wrong_letters(row: dict, rng: random.Random) -> tuple[str, str]:
    """The count off by one or two."""
    word, count = re.fullmatch(r"The word (.+) has (\d+) letters\.", row["output"]).groups()
    wrong = int(count) + rng.choice([-2, -1, 1, 2])
    return "off", f"The word {word} has {wrong} letters."


TASKS = [
    (_arithmetic, _wrong_arithmetic), (_capital, _wrong_capital), (_opposite, _wrong_opposite),
    (_plural, _wrong_plural), (_sort, _wrong_sort), (_uppercase, _wrong_casing), (_count, _wrong_count),
    (_letters, _wrong_letters),
]


def generate(rows: int = 640, seed: int = 11, per_prompt: int = 2, errors: bool = False) -> list[dict]:
    """Distinct pairs, an equal share per task (arithmetic, sorting and sequences fill what small tasks cannot), at most per_prompt
    pairs per prompt, shuffled; deterministic. errors: add each pair's kind of error as "error" (task/kind)."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    per: dict[str, int] = {}
    result: list[dict] = []

    def take(task, wrong, count: int) -> None:
        added = attempts = 0
        while added < count and attempts < count * 50:
            attempts += 1
            row = task(rng)
            kind, rejected = wrong(row, rng)
            pair = {"prompt": prompt_of(row), "chosen": row["output"], "rejected": rejected}
            key = (pair["prompt"], rejected)
            if rejected != pair["chosen"] and key not in seen and per.get(pair["prompt"], 0) < per_prompt:
                seen.add(key)
                per[pair["prompt"]] = per.get(pair["prompt"], 0) + 1
                result.append({**pair, "error": f"{task.__name__[1:]}/{kind}"} if errors else pair)
                added += 1

    for task, wrong in TASKS:
        take(task, wrong, rows // len(TASKS))
    fillers = [(task, wrong) for task, wrong in TASKS if task in (_arithmetic, _sort, _count)]
    for index, (task, wrong) in enumerate(fillers):  # the tasks with prompts to spare fill what small ones cannot
        take(task, wrong, (rows - len(result)) // (len(fillers) - index))
    rng.shuffle(result)
    return result


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(generate(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT}")
