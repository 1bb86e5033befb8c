"""What every config section shares: strictness (unknown keys are refused) and the dtype names."""

from typing import Literal

import dagster as dg
import pydantic

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]


class StrictSection(dg.Config):
    """A config section that refuses keys it does not know (a typo is an error, not a silent default)."""

    model_config = pydantic.ConfigDict(extra="forbid")


def names_from_string(value: object) -> object:
    """A list of names given as one comma-separated string (`--set lora.target_modules=q_proj,v_proj`) as a
    list; anything else as it is, for the field's own validation."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
