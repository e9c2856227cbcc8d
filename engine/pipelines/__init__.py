from .personalize import PersonalizePipeline, PersonalizePipelineOutput, SheetEmbeds

__all__ = ["PersonalizePipeline", "PersonalizePipelineOutput", "SheetEmbeds"]
