"""SerialGen Studio UI (Gradio). No torch code here: the engine does the work."""

from .ui import LAUNCH_OPTIONS, build_demo

__all__ = ["LAUNCH_OPTIONS", "build_demo"]
