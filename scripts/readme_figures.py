"""Rewrites the README's demo output with what `make demo` prints now (`make readme-figures`).

Runs configs/tiny-demo.yaml in a fresh store and Dagster instance, then puts its summary lines (the held-out
loss of base, adapter and merged model, the run time) into the README's demo block, between the lines
'<!-- --8<-- [start:demo-output] -->' and '<!-- --8<-- [end:demo-output] -->': snippet markers, so the docs' first-run
page includes the same block (pymdownx.snippets). tests/test_cli.py checks the figures against a demo run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- --8<-- [start:demo-output] -->", "<!-- --8<-- [end:demo-output] -->"
LOSS_LINE = re.compile(r"^held-out loss \(per-example mean\): .*$", re.MULTILINE)
FINISHED = re.compile(r"finished in (\d+)s")


def demo_output() -> str:
    """The demo's summary (stdout and stderr together), run in a temporary store."""
    with tempfile.TemporaryDirectory(prefix="readme-figures-") as folder:
        env = {**os.environ, "DAGSTER_HOME": f"{folder}/dagster", "LORA_PIPELINE_STORAGE": f"{folder}/store"}
        done = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", "run", "configs/tiny-demo.yaml"], cwd=REPO,
                              env=env, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def readme_block(output: str) -> str:
    """The README's demo block for this output."""
    seconds = FINISHED.search(output).group(1)
    return "\n".join([
        START, "```text", f"model tiny-demo: run 0b9e... finished in {seconds}s",
        "  raw_dataset        artifacts/tiny-demo/raw_dataset/793a2d9978cf26d9", "  ...",
        "  eval_report        artifacts/tiny-demo/eval_report/...", "", LOSS_LINE.search(output).group(0),
        "report: artifacts/tiny-demo/eval_report/.../report.md", "```", END])


def main() -> None:
    text = README.read_text(encoding="utf-8")
    start, end = text.index(START), text.index(END) + len(END)
    README.write_text(text[:start] + readme_block(demo_output()) + text[end:], encoding="utf-8")
    print(f"{README}: demo output rewritten")


if __name__ == "__main__":
    main()
