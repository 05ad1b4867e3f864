"""State-dict converters from peer libraries' models to pyvl's."""
from .timm import from_timm, register_timm_converter

__all__ = ["from_timm", "register_timm_converter"]
