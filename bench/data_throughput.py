"""Data-stage throughput: rows/s and peak memory from a JSONL file to formatted_dataset, at several sizes.

Generates N synthetic Alpaca rows (words drawn with the word frequencies of a real Alpaca sample,
lengths like Alpaca's: instruction 6-20 words, an input on a third of the rows, answers of 15-80
words), builds a base folder whose tokenizer is a byte-level BPE with a 32,000-token vocabulary
(Llama-2/Mistral size) trained on the first rows, then runs, in a fresh process per size,

    lora-pipeline run CONFIG --select raw_dataset,formatted_dataset --json

and reads the wall time of the two steps from the run's events, the stage's own split of its time
(reading and cleaning, waiting for the tokenizer to load, formatting) from its log, and the
process's peak RSS.

    python bench/data_throughput.py                # 100k and 1M rows
    python bench/data_throughput.py --rows 20000   # quick look
    python bench/data_throughput.py --repeat 3     # best of 3 on a busy machine

The class of a base's tokenizer is chosen once per folder and remembered (lora_pipeline/ml/base/tokenizer.py),
so that formatting need not import torch; the benchmark loads the tokenizer once before timing, as every
run after a base's first finds it.

Right after each run it times the tokenizer alone on the same rows: the texts the stage wrote,
chunk by chunk as it tokenized them, with encode_batch as the stage calls it, each chunk's
encodings freed before the next as the stage must. Formatting cannot be faster than that; the
ratios say how close it comes, for the whole step and for its per-row work (cleaning and
formatting, without loading the tokenizer, which the tokenizer-alone figure does not count either).

With --cpu it also runs the stage's work again in its own process (stage_cpu) and compares CPU seconds:
the tokenizer's share of the stage's CPU says how much of the gap is work outside the tokenizer,
which on cores the tokenizer fills costs wall time however it is overlapped.

    python bench/data_throughput.py --rows 100000 --cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import zip_longest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS_FROM = [REPO.parent / "shared" / "data" / "alpaca_en_demo.json", REPO / "lora_pipeline" / "data" / "sample_instructions.json"]
TOKENIZER_ROWS = 50_000
VOCAB = 32_000
MAX_LENGTH = 512


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


def warm_tokenizer_choice(base: Path):
    """The base's tokenizer, loaded through the hub the pipeline runs with (cwd REPO), so its class is remembered."""
    from lora_pipeline.resources.hub import ModelHub

    return ModelHub(cache_dir=str(REPO / ModelHub().cache_dir)).tokenizer(str(base), None, lambda: [])


def run_pipeline(config: Path, data: Path, base: Path, work: Path) -> dict:
    env = {**os.environ, "DAGSTER_HOME": str(work / "dagster_home"), "LORA_PIPELINE_STORAGE": str(work / "store")}
    command = [
        sys.executable, "-m", "lora_pipeline.cli", "run", str(config), "--select", "raw_dataset,formatted_dataset",
        "--set", f"dataset.source={data}", "--set", f"base_model={base}", "--json",
    ]
    shutil.rmtree(work, ignore_errors=True)  # a kept store from an earlier run would make the steps up to date
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
        "stage_seconds": _stage_seconds(log),
        "formatted": summary["assets"]["formatted_dataset"]["metadata"],
        "formatted_folder": Path(summary["assets"]["formatted_dataset"]["uri"]),
        "raw_folder": Path(summary["assets"]["raw_dataset"]["uri"]),
    }


def tokenizer_alone(base: Path, formatted_folder: Path) -> dict:
    """Seconds of the tokenizer alone on the texts formatted_dataset tokenized, called as the stage calls it.

    The texts are the ones the stage wrote, a chunk at a time (each of its chunks is one row group
    of the train file and one of the eval file): the same rows, in the same batches. They are
    tokenized with encode_batch (offsets on), each chunk's encodings freed before the next as the
    stage must, with the Python heap frozen as the stage has it; only tokenizing and freeing are
    timed, not reading.
    """
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    encode_batch = AutoTokenizer.from_pretrained(base).backend_tokenizer.encode_batch
    splits = [pq.ParquetFile(formatted_folder / f"{split}.parquet") for split in ("train", "eval")]
    seconds, cpu_seconds, rows, tokens = 0.0, 0.0, 0, 0
    gc.freeze()  # as formatted_dataset does around its tokenizer calls
    for groups in zip_longest(*(range(split.num_row_groups) for split in splits)):
        texts = []
        for split, group in zip(splits, groups):
            if group is not None:
                texts += split.read_row_group(group, columns=["text"]).column(0).to_pylist()
        started, started_cpu = time.perf_counter(), time.process_time()
        encodings = encode_batch(texts, add_special_tokens=True)
        encoded, encoded_cpu = time.perf_counter(), time.process_time()
        tokens += sum(map(len, encodings))
        counted, counted_cpu = time.perf_counter(), time.process_time()
        del encodings
        seconds += (encoded - started) + (time.perf_counter() - counted)
        cpu_seconds += (encoded_cpu - started_cpu) + (time.process_time() - counted_cpu)
        rows += len(texts)
    gc.unfreeze()
    return {"rows": rows, "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens_per_s": round(tokens / seconds)}


def stage_cpu(base: Path, raw_folder: Path) -> dict:
    """CPU seconds (every thread's) of formatted_dataset's work, in this process, with the stage's own functions:
    reading and cleaning the raw rows, then formatting them, the tokenizer's share included.

    The stage overlaps its per-row work with the tokenizer, but where the tokenizer alone keeps every core
    busy (2 cores here), each CPU-second outside it costs wall time all the same: the formatted_dataset /
    tokenizer-alone ratio can then come near the tokenizer's share of the stage's CPU, not above it by
    much. The CPU the stage's threads lose to each other (allocator locks, three threads on two cores)
    counts as outside the tokenizer.
    """
    from lora_pipeline.assets.data import rows_in_folder
    from lora_pipeline.ml.data.clean import clean_rows
    from lora_pipeline.ml.data.formatted import FormatSettings, format_dataset

    tokenizer = warm_tokenizer_choice(base)
    started = time.process_time()
    cleaned = clean_rows(rows_in_folder(raw_folder))
    cleaned_at = time.process_time()
    with tempfile.TemporaryDirectory(prefix="lora-data-cpu-") as folder:
        format_dataset(cleaned, tokenizer, FormatSettings(max_length=MAX_LENGTH), folder=Path(folder))
    return {"clean_cpu_seconds": cleaned_at - started, "format_cpu_seconds": time.process_time() - cleaned_at}


def _stage_seconds(log: str) -> dict[str, float]:
    """formatted_dataset's own split of its time, from its log line."""
    found = re.search(r"read and cleaned [\d,]+ rows in ([\d.]+)s, then waited ([\d.]+)s for the tokenizer; "
                      r"formatted [\d,]+ rows in ([\d.]+)s", log)
    if not found:
        return {}
    return dict(zip(("clean", "tokenizer_wait", "format"), map(float, found.groups())))


def _step_seconds(log: str) -> dict[str, float]:
    seconds = {}
    for step, minutes, value, unit in re.findall(r'Finished execution of step "(\w+)" in (?:(\d+)m)?([\d.]+)(ms|s)', log):
        seconds[step] = int(minutes or 0) * 60 + float(value) / (1000 if unit == "ms" else 1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="dataset sizes to run")
    parser.add_argument("--keep", type=Path, help="keep the generated data and base here (reused when present)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size, each followed by the tokenizer alone; "
                        "the best of each is reported")
    parser.add_argument("--cpu", action="store_true", help="also run the stage's work in this process once per run and "
                        "report its CPU seconds against the tokenizer's (stage_cpu)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-data-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        config = work / "bench-data.yaml"
        config.write_text("base_model: builtin:tiny-llama\ndataset:\n  source: unused\n  format: auto\n"
                          f"training:\n  max_length: {MAX_LENGTH}\n")
        results = []
        for rows in args.rows:
            data = work / f"alpaca_{rows}.jsonl"
            if not data.exists():
                print(f"generating {rows:,} rows ...", file=sys.stderr)
                write_rows(data, rows)
            base = work / f"base_{rows}"
            if not (base / "config.json").exists():
                build_base(data, base)
            warm_tokenizer_choice(base)
            runs, alone, cpu = [], [], []
            for _ in range(args.repeat):
                runs.append(run_pipeline(config, data, base, work / f"run_{rows}"))
                alone.append(tokenizer_alone(base, runs[-1]["formatted_folder"]))
                if args.cpu:
                    cpu.append(stage_cpu(base, runs[-1]["raw_folder"]))
            results.append(_summary(rows, data, runs, alone, cpu))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{os.cpu_count()} cores; best of {args.repeat}. Tokenizer alone: encode_batch with offsets, in the stage's "
          "chunks, on the same texts. Per-row work: cleaning + formatting, without loading the tokenizer.")
    print("\n| rows | file MB | tokens/row | raw_dataset s | formatted_dataset s | of which clean / tokenizer wait / format s "
          "| tokenizer alone s | rows/s formatted_dataset | rows/s tokenizer alone | formatted_dataset / tokenizer "
          "| per-row work / tokenizer | rows/s (raw + formatted) | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['file_mb']} | {r['tokens_per_row']} | {r['raw_dataset_s']} | {r['formatted_dataset_s']} | "
              f"{r['clean_s']} / {r['tokenizer_wait_s']} / {r['format_s']} | {r['tokenizer_alone_s']} | "
              f"{r['rows_per_s_formatted']:,} | {r['rows_per_s_tokenizer_alone']:,} | {r['ratio_step']:.0%} | "
              f"{_percent(r['ratio_per_row_work'])} | {r['rows_per_s_assets']:,} | {r['peak_rss_mb']:,} |")
    if args.cpu:
        print("\nCPU seconds of every thread, the stage's work run in the benchmark's process; the tokenizer's share "
              "is the tokenizer alone's.\n\n| rows | clean CPU s | format CPU s | tokenizer alone CPU s "
              "| outside the tokenizer CPU s | tokenizer's share of the stage's CPU |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in results:
            c = r["cpu"]
            print(f"| {r['rows']:,} | {c['clean_s']} | {c['format_s']} | {c['tokenizer_s']} | {c['outside_tokenizer_s']} "
                  f"| {c['tokenizer_share']:.0%} |")


def _percent(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.0%}"


def _summary(rows: int, data: Path, runs: list[dict], alone: list[dict], cpu: list[dict]) -> dict:
    """The best of the runs of one size (each figure on its own), beside the best tokenizer-alone time."""
    def best(values):
        return min(values)

    formatted_s = best(r["step_seconds"].get("formatted_dataset", 0) for r in runs)
    raw_s = best(r["step_seconds"].get("raw_dataset", 0) for r in runs)
    assets_s = best(r["step_seconds"].get("raw_dataset", 0) + r["step_seconds"].get("formatted_dataset", 0) for r in runs)
    per_row_s = best(r["stage_seconds"].get("clean", 0) + r["stage_seconds"].get("format", 0) for r in runs)
    stage = min((r["stage_seconds"] for r in runs), key=lambda s: s.get("clean", 0) + s.get("format", 0))
    alone_s = best(a["seconds"] for a in alone)
    meta = runs[0]["formatted"]
    return {
        "rows": rows,
        "file_mb": round(data.stat().st_size / 2**20, 1),
        "tokens_per_row": round(meta["train_tokens"] / max(meta["train_rows"], 1), 1),
        "raw_dataset_s": round(raw_s, 1),
        "formatted_dataset_s": round(formatted_s, 1),
        "clean_s": round(stage.get("clean", 0), 1),
        "tokenizer_wait_s": round(stage.get("tokenizer_wait", 0), 1),
        "format_s": round(stage.get("format", 0), 1),
        "tokenizer_alone_s": round(alone_s, 1),
        "tokenizer_alone_tokens_per_s": max(a["tokens_per_s"] for a in alone),
        "rows_per_s_formatted": round(rows / formatted_s),
        "rows_per_s_tokenizer_alone": round(alone[0]["rows"] / alone_s),
        "ratio_step": round(alone_s / formatted_s * rows / alone[0]["rows"], 3),
        "ratio_per_row_work": round(alone_s / per_row_s * rows / alone[0]["rows"], 3) if per_row_s else None,
        "checks_s": round(min(sum(v for k, v in r["step_seconds"].items() if k not in ("raw_dataset", "formatted_dataset"))
                              for r in runs), 1),
        "rows_per_s_assets": round(rows / assets_s),
        "rows_per_s_process": round(rows / min(r["process_wall_seconds"] for r in runs)),
        "process_wall_s": round(min(r["process_wall_seconds"] for r in runs), 1),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
        **({"cpu": _cpu_summary(rows, alone, cpu)} if cpu else {}),
    }


def _cpu_summary(rows: int, alone: list[dict], cpu: list[dict]) -> dict:
    """The least CPU the stage's work took, beside the tokenizer alone's (scaled, like the ratios above, from the
    rows it tokenized to every row read)."""
    stage = min(cpu, key=lambda c: c["clean_cpu_seconds"] + c["format_cpu_seconds"])
    stage_s = stage["clean_cpu_seconds"] + stage["format_cpu_seconds"]
    tokenizer_s = min(a["cpu_seconds"] for a in alone) * rows / alone[0]["rows"]
    return {
        "clean_s": round(stage["clean_cpu_seconds"], 1),
        "format_s": round(stage["format_cpu_seconds"], 1),
        "tokenizer_s": round(tokenizer_s, 1),
        "outside_tokenizer_s": round(stage_s - tokenizer_s, 1),
        "tokenizer_share": round(tokenizer_s / stage_s, 3),
    }


if __name__ == "__main__":
    main()
