from .personalize import PersonalizePipeline, PersonalizePipelineOutput, SheetEmbeds
from .standardize import StandardizePipeline, StandardizePipelineOutput

__all__ = [
    "PersonalizePipeline",
    "PersonalizePipelineOutput",
    "SheetEmbeds",
    "StandardizePipeline",
    "StandardizePipelineOutput",
]
