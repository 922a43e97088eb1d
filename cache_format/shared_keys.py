"""Keys that more than one stage reads: now in cache_format.config."""

# shim: removed by the structure issue's last step
from .config import AnalysisKeys, HarvestKeys, TrainKeys

__all__ = ["AnalysisKeys", "HarvestKeys", "TrainKeys"]
