"""SerialGen inference engine: presets, models, pipelines, preprocessing (no UI code)."""

from .loading import Engine, EngineLoadError, LoadedComponent, load_engine
from .models import IPAdapterModules
from .pipelines import PersonalizePipeline, PersonalizePipelineOutput, SheetEmbeds
from .presets import PRESETS, ComponentSource, Preset, get_preset

__all__ = [
    "PRESETS",
    "ComponentSource",
    "Engine",
    "EngineLoadError",
    "IPAdapterModules",
    "LoadedComponent",
    "PersonalizePipeline",
    "PersonalizePipelineOutput",
    "Preset",
    "SheetEmbeds",
    "get_preset",
    "load_engine",
]
