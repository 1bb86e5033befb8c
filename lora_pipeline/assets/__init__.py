"""The pipeline's stages, one module each, and the settings assets they depend on.

Every module here or in a sub-package (handoff/) that is not a helper declares its stages with
`pipeline_asset` (and may list its asset checks as CHECKS, assets partitioned otherwise as
OTHER_ASSETS, and on-demand ones that no job runs on its own as ON_DEMAND_ASSETS); importing the
package imports them all, so a new stage is one new module. The order comes from the graph
(stages.pipeline()).
"""
import importlib
import pkgutil

# Modules of shared machinery, not stages.
_HELPERS = {"common", "provenance", "settings", "stages"}
# Stage modules here and in the sub-packages that group them by concern (handoff/: the on-demand stages;
# preference/: the preference objectives' branches of three stages).
_STAGE_MODULES = [importlib.import_module(info.name) for info in pkgutil.walk_packages(__path__, f"{__name__}.")
                  if not info.ispkg and info.name.rsplit(".", 1)[-1] not in _HELPERS]

from lora_pipeline.assets import stages  # noqa: E402
from lora_pipeline.assets.settings import settings_specs  # noqa: E402

PIPELINE_ASSETS = stages.definitions()
PIPELINE_CHECKS = [check for module in _STAGE_MODULES for check in getattr(module, "CHECKS", [])]
# On-demand hand-offs after a stage (published_model): in the graph, never in the tune job.
ON_DEMAND_ASSETS = [asset for module in _STAGE_MODULES for asset in getattr(module, "ON_DEMAND_ASSETS", [])]
# Assets of another partitioning than one per model (the sweeps' leaderboards).
OTHER_ASSETS = [asset for module in _STAGE_MODULES for asset in getattr(module, "OTHER_ASSETS", [])]
SETTINGS_SPECS = settings_specs()

globals().update({definition.key.path[-1]: definition for definition in [*PIPELINE_ASSETS, *ON_DEMAND_ASSETS]})

__all__ = ["PIPELINE_ASSETS", "PIPELINE_CHECKS", "OTHER_ASSETS", "ON_DEMAND_ASSETS", "SETTINGS_SPECS"] + [a.key.path[-1] for a in [*PIPELINE_ASSETS, *ON_DEMAND_ASSETS]]
