"""SerialGen Studio UI (Gradio). No torch code here: the engine does the work."""

from .ui import build_demo

__all__ = ["build_demo"]
