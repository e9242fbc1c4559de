"""Gradio front end. Imports gradio, never torch: the backend service is passed in."""
from .app import UIConfig, build_ui

__all__ = ["UIConfig", "build_ui"]
