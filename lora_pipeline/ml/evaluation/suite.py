"""What every model is scored on: the held-out examples, the metrics and the decoding, and its digest.

Two models are comparable example by example only when they were scored on the same suite, so a
suite has a digest; scores are cached under (weights, suite digest) and an unchanged suite is
never scored twice. Dagster-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# Bump when the scoring code changes what it computes for the same suite (invalidates cached scores).
SCORING_VERSION = "1"
GENERAL_TEXT = "general_text.txt"
PROBE_MAX_TOKENS = 96


@dataclass(frozen=True)
class EvalSuite:
    """The held-out examples (formatted rows with a trained token), the metrics, and the decoding."""

    frame: "pd.DataFrame"
    metrics: tuple[str, ...]
    max_new_tokens: int
    batch_size: int

    @property
    def generates(self) -> bool:
        """Whether any metric scores a generated answer (so each model answers every prompt)."""
        return any(name not in ("loss", "token_accuracy") for name in self.metrics)


def scorable_rows(frame: "pd.DataFrame") -> "pd.DataFrame":
    """The rows with a trained token after the first position (the others predict nothing), renumbered 0..n-1."""
    import numpy as np

    keep = [bool((np.asarray(mask)[1:] == 1).any()) for mask in frame["loss_mask"]]
    return frame[keep].reset_index(drop=True)


def held_out_examples(eval_split, max_examples: int) -> "pd.DataFrame":
    """The held-out examples every score of a config is on: the eval split's first max_examples rows, the
    scorable ones of them (eval_report and the evaluation while training read the same)."""
    import pandas as pd

    return scorable_rows(pd.read_parquet(eval_split).head(max_examples))


def suite_digest(data_digest: str, suite: EvalSuite) -> str:
    """The suite's identity: the held-out data's content digest, its size, the metrics and the decoding."""
    payload = {
        "data": data_digest,
        "examples": len(suite.frame),
        "metrics": list(suite.metrics),
        "max_new_tokens": suite.max_new_tokens,
        # Batch composition changes padding and so, in low precision, the last digits of a loss.
        "batch_size": suite.batch_size,
        "scoring": SCORING_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def general_text() -> list[str]:
    """The forgetting probe's general-text sample the package ships (one passage per line)."""
    text = resources.files("lora_pipeline.data").joinpath(GENERAL_TEXT).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def probe_frame(tokenizer) -> "pd.DataFrame":
    """The general-text sample tokenized for scoring every token (the loss a language model has on plain text)."""
    import pandas as pd

    rows = []
    for passage in general_text():
        ids = tokenizer(passage, add_special_tokens=True)["input_ids"][:PROBE_MAX_TOKENS]
        rows.append({"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)})
    return scorable_rows(pd.DataFrame(rows))
