"""`--select`, the grammar `lora-pipeline run` and `promote` share: asset names with dbt-style '+' edges, or
Dagster's own selection strings; on-demand stages only when named."""

from __future__ import annotations

import difflib
import re

import dagster as dg

from lora_pipeline.assets import ON_DEMAND_ASSETS, PIPELINE_ASSETS, SETTINGS_SPECS
from lora_pipeline.assets.stages import stage_names
from lora_pipeline.errors import ConfigError

# Stages that run only when --select names them (publishing): never part of '*', 'name+' or an up-to-date check.
ON_DEMAND = [asset.key.path[-1] for asset in ON_DEMAND_ASSETS]


def selection(text: str) -> dg.AssetSelection:
    """Parse --select: comma-separated names with dbt-style '+' edges, or Dagster selection strings."""
    chosen = None
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\+?)([a-z_]+)(\+?)", part)
        if part == "*":
            piece = dg.AssetSelection.all()
        elif match:
            _require_stage(match.group(2))
            piece = dg.AssetSelection.assets(match.group(2))
            if match.group(1):
                piece = piece.upstream()
            if match.group(3):
                piece = piece.downstream()
        else:
            try:
                piece = dg.AssetSelection.from_string(part)
            except Exception as exc:  # Dagster's parser raises several types
                raise ConfigError(f"--select {part!r}: {str(exc).splitlines()[0]}") from None
        unnamed = [name for name in ON_DEMAND if name not in part]
        if unnamed:  # '*' or 'champion+' must not publish
            piece = piece - dg.AssetSelection.assets(*unnamed)
        chosen = piece if chosen is None else chosen | piece
    if chosen is None:
        raise ConfigError("--select is empty")
    return chosen


def _require_stage(name: str) -> None:
    """Refuse a name that is no stage, with the closest one and the list (Dagster's own words name its internals)."""
    names = [*stage_names(), *ON_DEMAND]
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"--select: no stage named {name!r}; {hint}the stages are {', '.join(names)}")


def selected_asset_names(chosen: dg.AssetSelection) -> list[str]:
    """The pipeline assets a selection names, in pipeline order."""
    try:
        # With the settings assets in the graph, 'key:trained_adapter_settings+' selects what that stage's
        # settings feed; only pipeline assets are run.
        keys = chosen.resolve([*PIPELINE_ASSETS, *ON_DEMAND_ASSETS, dg.AssetsDefinition(specs=SETTINGS_SPECS)])
    except Exception as exc:  # Dagster raises several types for bad selections
        raise ConfigError(f"--select: {exc}".splitlines()[0]) from None
    names = {key.to_user_string() for key in keys}
    return [name for name in [*stage_names(), *ON_DEMAND] if name in names]
