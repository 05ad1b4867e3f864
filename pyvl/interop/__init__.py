"""State-dict converters from peer libraries' models to pyvl's, and patch(model) that swaps a peer model's
modules for pyvl's in place."""
from .patch import patch
from .timm import from_timm, register_timm_converter
from .torchvision import from_torchvision

__all__ = ["from_timm", "from_torchvision", "patch", "register_timm_converter"]
