"""Data-stage throughput: rows/s and peak memory from a JSONL file to formatted_dataset, at several sizes.

Generates N synthetic Alpaca rows (words drawn with the word frequencies of a real Alpaca sample,
lengths like Alpaca's: instruction 6-20 words, an input on a third of the rows, answers of 15-80
words), builds a base folder whose tokenizer is a byte-level BPE with a 32,000-token vocabulary
(Llama-2/Mistral size) trained on the first rows, then runs, in a fresh process per size,

    lora-pipeline run CONFIG --select raw_dataset,formatted_dataset --json

and reads the wall time of the two steps from the run's events and the process's peak RSS.

    python bench/data_throughput.py                # 100k and 1M rows
    python bench/data_throughput.py --rows 20000   # quick look

It also times the tokenizer alone on the same texts: formatting cannot be faster than that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS_FROM = [REPO.parent / "shared" / "data" / "alpaca_en_demo.json", REPO / "lora_pipeline" / "data" / "sample_instructions.json"]
TOKENIZER_ROWS = 50_000
VOCAB = 32_000


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Synthetic Alpaca JSONL, generated in vectorised blocks (a million rows in seconds)."""
    import numpy as np

    source = next(p for p in WORDS_FROM if p.exists())
    counts = Counter(re.findall(r"[A-Za-z']+", source.read_text(encoding="utf-8")))
    words, freq = zip(*sorted(counts.items()))
    vocabulary = np.array(words)
    probabilities = np.array(freq, dtype=float) / sum(freq)
    rng = np.random.default_rng(seed)
    with path.open("w", encoding="utf-8") as handle:
        for start in range(0, rows, 50_000):
            block = min(50_000, rows - start)
            lengths = {
                "instruction": rng.integers(6, 21, block),
                "input": np.where(rng.random(block) < 1 / 3, rng.integers(5, 26, block), 0),
                "output": rng.integers(15, 81, block),
            }
            drawn = {k: iter(vocabulary[rng.choice(len(vocabulary), int(v.sum()), p=probabilities)]) for k, v in lengths.items()}
            for i in range(block):
                row = {k: " ".join(next(drawn[k]) for _ in range(int(lengths[k][i]))) for k in lengths}
                row["instruction"] = row["instruction"].capitalize() + "?"
                row["output"] = row["output"].capitalize() + "."
                handle.write(json.dumps(row) + "\n")


def build_base(data: Path, out: Path) -> None:
    """A tiny Llama whose tokenizer (byte-level BPE, 32k vocabulary) is trained on the first rows."""
    from lora_pipeline.ml.base.tiny import TinyLlamaShape, build_tiny_llama

    corpus = []
    with data.open(encoding="utf-8") as handle:
        for line, _ in zip(handle, range(TOKENIZER_ROWS)):
            row = json.loads(line)
            corpus.append(f"{row['instruction']}\n{row['input']}\n{row['output']}")
    build_tiny_llama(corpus, out, TinyLlamaShape(hidden_size=64, layers=1, vocab_size=VOCAB, max_positions=2048))


def run_pipeline(config: Path, data: Path, base: Path, work: Path) -> dict:
    env = {**os.environ, "DAGSTER_HOME": str(work / "dagster_home"), "LORA_PIPELINE_STORAGE": str(work / "store")}
    command = [
        sys.executable, "-m", "lora_pipeline.cli", "run", str(config), "--select", "raw_dataset,formatted_dataset",
        "--set", f"dataset.source={data}", "--set", f"base_model={base}", "--json",
    ]
    work.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = work / "stdout.txt", work / "stderr.txt"
    started = time.perf_counter()
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would mix in earlier runs).
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    log = stderr_path.read_text()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(log[-3000:])
    summary = json.loads(stdout_path.read_text().strip().splitlines()[-1])
    return {
        "process_wall_seconds": wall,
        "run_wall_seconds": summary["wall_seconds"],
        "step_seconds": _step_seconds(log),
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "formatted": summary["assets"]["formatted_dataset"]["metadata"],
    }


def tokenizer_ceiling(data: Path, base: Path, rows: int = 100_000) -> dict:
    """Rows/s of the tokenizer alone (batched, with offsets, as formatted_dataset calls it) on the same texts."""
    from transformers import AutoTokenizer

    from lora_pipeline.ml.data.templates import alpaca_prompt

    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = []
    with data.open(encoding="utf-8") as handle:
        for line, _ in zip(handle, range(rows)):
            row = json.loads(line)
            texts.append(alpaca_prompt(row["instruction"], row["input"]) + row["output"] + tokenizer.eos_token)
    started = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)
    seconds = time.perf_counter() - started
    tokens = sum(len(encoding.ids) for encoding in encodings)
    return {"rows_per_s": round(len(texts) / seconds), "tokens_per_s": round(tokens / seconds)}


def _step_seconds(log: str) -> dict[str, float]:
    seconds = {}
    for step, minutes, value, unit in re.findall(r'Finished execution of step "(\w+)" in (?:(\d+)m)?([\d.]+)(ms|s)', log):
        seconds[step] = int(minutes or 0) * 60 + float(value) / (1000 if unit == "ms" else 1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="dataset sizes to run")
    parser.add_argument("--keep", type=Path, help="keep the generated data and base here (reused when present)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-data-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        config = work / "bench-data.yaml"
        config.write_text("base_model: builtin:tiny-llama\ndataset:\n  source: unused\n  format: auto\n"
                          "training:\n  max_length: 512\n")
        results = []
        for rows in args.rows:
            data = work / f"alpaca_{rows}.jsonl"
            if not data.exists():
                print(f"generating {rows:,} rows ...", file=sys.stderr)
                write_rows(data, rows)
            base = work / f"base_{rows}"
            if not (base / "config.json").exists():
                build_base(data, base)
            result = run_pipeline(config, data, base, work / f"run_{rows}")
            steps = result["step_seconds"]
            data_seconds = steps.get("raw_dataset", 0) + steps.get("formatted_dataset", 0)
            meta = result["formatted"]
            results.append({
                "rows": rows,
                "file_mb": round(data.stat().st_size / 2**20, 1),
                "tokens_per_row": round(meta["train_tokens"] / max(meta["train_rows"], 1), 1),
                "raw_dataset_s": round(steps.get("raw_dataset", 0), 1),
                "formatted_dataset_s": round(steps.get("formatted_dataset", 0), 1),
                "checks_s": round(sum(v for k, v in steps.items() if k not in ("raw_dataset", "formatted_dataset")), 1),
                "rows_per_s_assets": round(rows / data_seconds),
                "rows_per_s_process": round(rows / result["process_wall_seconds"]),
                "process_wall_s": round(result["process_wall_seconds"], 1),
                "peak_rss_mb": round(result["peak_rss_mb"]),
            })
            print(json.dumps(results[-1]), flush=True)
        ceiling = tokenizer_ceiling(work / f"alpaca_{args.rows[0]}.jsonl", work / f"base_{args.rows[0]}")
    print(f"\ntokenizer alone (encode_batch with offsets, {os.cpu_count()} cores): {ceiling['rows_per_s']:,} rows/s, "
          f"{ceiling['tokens_per_s']:,} tokens/s")
    print("\n| rows | file MB | tokens/row | raw_dataset s | formatted_dataset s | checks s | rows/s (assets) | rows/s (whole process) | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['file_mb']} | {r['tokens_per_row']} | {r['raw_dataset_s']} | {r['formatted_dataset_s']} | "
              f"{r['checks_s']} | {r['rows_per_s_assets']:,} | {r['rows_per_s_process']:,} | {r['peak_rss_mb']:,} |")


if __name__ == "__main__":
    main()
