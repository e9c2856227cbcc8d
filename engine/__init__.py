"""SerialGen inference engine: presets, models, pipelines, preprocessing (no UI code).

Imports are lazy (as in diffusers): ``engine.preprocess.pose`` and the synthetic world need only numpy and Pillow,
so importing a light submodule must not pull in torch and diffusers.
"""

import importlib

_EXPORTS = {
    "Engine": ".engine",
    "EngineLoadError": ".engine",
    "LoadedComponent": ".engine",
    "load_engine": ".loading",
    "IPAdapterModules": ".models",
    "PoseGuider": ".models",
    "ReferenceConditioner": ".models",
    "PersonalizePipeline": ".pipelines",
    "PersonalizePipelineOutput": ".pipelines",
    "SheetEmbeds": ".pipelines",
    "StandardizePipeline": ".pipelines",
    "StandardizePipelineOutput": ".pipelines",
    "PRESETS": ".presets",
    "ComponentSource": ".presets",
    "Preset": ".presets",
    "get_preset": ".presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
