"""The GPU bench's result lines and the table it ends with. Pure Python: the CPU test feeds it sample lines.

Every part prints one JSON object on a line of its own, tagged {"bench": "lora-gpu", ...}, amid whatever the
libraries log; parse_result_lines picks those out again (from a child's output or a saved log), and
summary_table turns them into the table printed last and written beside gpu_results.json.
"""

from __future__ import annotations

import json
from typing import Iterable

TAG = "lora-gpu"
GIB = 1024**3

# (header, record key, format) in table order; a missing value prints as "-".
COLUMNS = (
    ("tokens/s", "steady_tokens_per_s", "{:,.0f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("MFU 6N", "mfu_6n", "{:.1%}"),
    ("batch", "micro_batch", "{}"),
    ("train s", "train_s", "{:.1f}"),
    ("peak GiB", "peak_gib", "{:.2f}"),
    ("plan GiB", "plan_allocated_gib", "{:.2f}"),
    ("peak/plan", "peak_over_plan", "{:.2f}"),
)


def result_line(record: dict) -> str:
    """One record as the tagged JSON line a part prints."""
    return json.dumps({"bench": TAG, **record}, default=str)


def parse_result_lines(lines: str | Iterable[str]) -> list[dict]:
    """The tagged records among arbitrary output lines, in order; other lines (and broken JSON) are skipped."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    records = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{") or f'"{TAG}"' not in line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("bench") == TAG:
            records.append(record)
    return records


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None and key == "steady_tokens_per_s":
        value = record.get("tokens_per_s")  # parts too short for a steady span report the overall rate
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _note(record: dict) -> str:
    if record.get("status") != "ok":
        return str(record.get("error") or record.get("reason") or "")[:90]
    return str(record.get("note") or "")


def summary_table(records: list[dict]) -> str:
    """The benchmark parts as a fixed-width text table (environment and build records that went well are left to
    the JSON; one that did not is a row, since the parts after it depend on it)."""
    rows = [r for r in records if r.get("part") not in ("environment", "qlora8b-build") or r.get("status") != "ok"]
    header = ["part", "status", *(name for name, _, _ in COLUMNS), "note"]
    body = [[f"{r.get('part')}" + (f":{r['variant']}" if r.get("variant") else ""), str(r.get("status", "?")),
             *(_cell(r, key, fmt) for _, key, fmt in COLUMNS), _note(r)] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    environment = next((r for r in records if r.get("part") == "environment" and r.get("status") == "ok"), None)
    if environment:
        lines.insert(0, environment_line(environment))
    for note in dict.fromkeys(note for r in rows for note in r.get("compat") or []):
        lines.append(f"compat: {note}")
    if any(r.get("mfu_6n") is not None for r in rows):
        lines.append("MFU counts 4N + LoRA adapters + causal attention per token against the peak; "
                     "MFU 6N is TRL's convention, which overstates LoRA's matmul work by 1.5x.")
    return "\n".join(lines)


def environment_line(environment: dict) -> str:
    """One line naming the device and the versions that matter."""
    versions = environment.get("versions", {})
    names = ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger_kernel")
    listed = ", ".join(f"{name} {versions[name]}" for name in names if versions.get(name))
    matmul = environment.get("bf16_matmul_tflops")
    measured = f", bf16 matmul {matmul:.0f} TFLOP/s measured" if matmul else ""
    return f"{environment.get('device_name', '?')}{measured}; {listed}"


def results_document(records: list[dict]) -> dict:
    """What gpu_results.json holds: the environment record apart, then every part's record."""
    environment = next((r for r in records if r.get("part") == "environment"), None)
    return {"environment": environment, "results": [r for r in records if r is not environment]}


def with_derived(record: dict) -> dict:
    """The record with peak/plan filled in where both are known."""
    peak, plan = record.get("peak_gib"), record.get("plan_allocated_gib")
    if peak and plan:
        return {**record, "peak_over_plan": peak / plan}
    return record
