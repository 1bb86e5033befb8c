"""What every config section shares: strictness (unknown keys are refused) and the dtype names."""

from typing import Literal

import dagster as dg
import pydantic

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]


class StrictSection(dg.Config):
    """A config section that refuses keys it does not know (a typo is an error, not a silent default)."""

    model_config = pydantic.ConfigDict(extra="forbid")
