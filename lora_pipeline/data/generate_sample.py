"""Writes sample_instructions.json, the bundled demo dataset (Alpaca format).

The tasks are small and regular (arithmetic, capitals, opposites, plurals, sorting, casing,
counting) so that a tiny model trained for a minute on a laptop CPU visibly learns them: the
held-out loss drops well below the base model's and the answers take the right shape.
Deterministic: the same seed writes the same file. Run `python -m lora_pipeline.data.generate_sample`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUTPUT = Path(__file__).with_name("sample_instructions.json")

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra", "Peru": "Lima", "Chile": "Santiago",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
    "early": "late", "full": "empty", "hard": "soft", "high": "low", "long": "short", "old": "new",
    "rich": "poor", "strong": "weak", "wet": "dry", "loud": "quiet", "up": "down", "left": "right",
    "true": "false", "win": "lose", "first": "last", "inside": "outside", "before": "after", "push": "pull",
}
PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "city": "cities", "child": "children", "mouse": "mice",
    "leaf": "leaves", "bus": "buses", "tooth": "teeth", "man": "men", "woman": "women", "foot": "feet",
    "baby": "babies", "knife": "knives", "glass": "glasses", "story": "stories", "wolf": "wolves",
    "potato": "potatoes", "person": "people", "church": "churches", "day": "days", "key": "keys",
}
WORDS = [
    "garden", "river", "window", "planet", "coffee", "silver", "forest", "pencil", "rocket", "summer",
    "market", "bridge", "candle", "dragon", "island", "jacket", "lemon", "marble", "orange", "pillow",
    "rabbit", "saddle", "ticket", "violin", "winter", "yellow", "anchor", "butter", "circle", "doctor",
]


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    a, b = max(a, b), min(a, b)
    return {"instruction": f"What is {a} minus {b}?", "input": "", "output": f"{a} minus {b} is {a - b}."}


def _capital(rng: random.Random) -> dict:
    country = rng.choice(list(CAPITALS))
    question = rng.choice(["What is the capital of {}?", "Name the capital city of {}."]).format(country)
    return {"instruction": question, "input": "", "output": f"The capital of {country} is {CAPITALS[country]}."}


def _opposite(rng: random.Random) -> dict:
    word = rng.choice(list(OPPOSITES))
    if rng.random() < 0.5:
        return {"instruction": "Give the opposite of the word.", "input": word,
                "output": f"The opposite of {word} is {OPPOSITES[word]}."}
    return {"instruction": f"What is the opposite of {word}?", "input": "",
            "output": f"The opposite of {word} is {OPPOSITES[word]}."}


def _plural(rng: random.Random) -> dict:
    word = rng.choice(list(PLURALS))
    question = rng.choice(["What is the plural of {}?", "Write the plural form of {}."]).format(word)
    return {"instruction": question, "input": "",
            "output": f"The plural of {word} is {PLURALS[word]}."}


def _sort(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    return {"instruction": "Sort the numbers from smallest to largest.", "input": ", ".join(map(str, numbers)),
            "output": ", ".join(map(str, sorted(numbers)))}


def _uppercase(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
    return {"instruction": "Write the word in lowercase letters.", "input": word.upper(), "output": word}


def _count(rng: random.Random) -> dict:
    start, step = rng.randint(1, 20), rng.randint(1, 5)
    shown = [start + i * step for i in range(3)]
    following = [start + i * step for i in range(3, 6)]
    return {"instruction": "Continue the sequence with the next three numbers.", "input": ", ".join(map(str, shown)),
            "output": ", ".join(map(str, following))}


def _letters(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"instruction": f"How many letters are in the word {word}?", "input": "",
            "output": f"The word {word} has {len(word)} letters."}


TASKS = [_arithmetic, _capital, _opposite, _plural, _sort, _uppercase, _count, _letters]


def generate(rows: int = 640, seed: int = 7) -> list[dict]:
    """Distinct rows, an equal share per task (arithmetic fills what small tasks cannot), shuffled; deterministic."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    result: list[dict] = []

    def take(task, count: int) -> None:
        added = attempts = 0
        while added < count and attempts < count * 50:
            attempts += 1
            row = task(rng)
            if (row["instruction"], row["input"]) not in seen:
                seen.add((row["instruction"], row["input"]))
                result.append(row)
                added += 1

    for task in TASKS:
        take(task, rows // len(TASKS))
    take(_arithmetic, rows - len(result))
    rng.shuffle(result)
    return result


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(generate(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT}")
