"""State-dict converters from peer libraries' models to pyvl's."""
from .timm import from_timm, register_timm_converter

__all__ = ["from_timm", "register_timm_converter"]
from .open_clip import from_open_clip  # noqa: E402

__all__ += ["from_open_clip"]
