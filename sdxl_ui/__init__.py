"""sdxl_ui: Stable Diffusion XL in the browser on whatever hardware you have.

Importing the package is cheap: torch and diffusers load only when a model is used, so the UI layer and the
CLI's argument checks start fast. ``ImageService`` is the seed document's Python API.
"""
__version__ = "0.1.0"
__all__ = ["ImageService", "GenerationService", "__version__"]


def __getattr__(name):  # lazy: `from sdxl_ui import ImageService` without importing torch at package import
    if name == "ImageService":
        from .api import ImageService

        return ImageService
    if name == "GenerationService":
        from .service import GenerationService

        return GenerationService
    raise AttributeError(name)
