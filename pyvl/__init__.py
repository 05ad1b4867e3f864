"""pyvl: fast kernels (Triton, CUDA, C++) and faithful models for vision and vision-language papers.

    import pyvl
    y = pyvl.ops.depthwise_conv2d(x, weight, stride=2)          # drop-in op, backend chosen for you
    model = pyvl.models.mobilenet_v1()                           # one model per paper
    model = pyvl.interop.from_timm(timm.create_model("mobilenetv1_100"))
    pyvl.patch(torchvision.models.swin_t())                      # swap a peer model's attention in place

`pyvl info` lists the backends and why any is unavailable; `pyvl bench` runs the benchmarks.
"""
import torch  # noqa: F401  (pyvl._C links against torch's libraries, so torch loads first)

from . import ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "interop", "testing", "patch", "__version__"]


def __getattr__(name):
    # nn, models, interop and testing import lazily: `import pyvl` stays cheap and needs no hypothesis or timm.
    if name in ("nn", "models", "interop", "testing"):
        import importlib

        return importlib.import_module(f"pyvl.{name}")
    if name == "patch":
        from .interop.patch import patch

        return patch
    raise AttributeError(f"module 'pyvl' has no attribute {name!r}")
