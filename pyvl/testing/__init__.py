"""pyvl.testing: the error criterion and hypothesis strategies, for pyvl's tests and for anyone testing kernels.

Hypothesis profiles: "ci" (deterministic, few examples; the default) and "extended" (many examples), chosen by
the environment variable PYVL_HYPOTHESIS_PROFILE. Call load_profile() once (pyvl's tests/conftest.py does).
"""
from __future__ import annotations

import os

from ._criterion import (assert_close_to_reference, assert_gradients_close_to_reference, check_error_criterion,
                         default_atol, gradients)
from .models import randomize_norms

PROFILE_ENV = "PYVL_HYPOTHESIS_PROFILE"

__all__ = ["assert_close_to_reference", "assert_gradients_close_to_reference", "check_error_criterion",
           "default_atol", "gradients", "load_profile", "randomize_norms", "strategies"]


def load_profile(name: str | None = None) -> str:
    """Register pyvl's hypothesis profiles and load `name` (default: $PYVL_HYPOTHESIS_PROFILE or "ci")."""
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **common)
    settings.register_profile("extended", max_examples=500, **common)
    name = name or os.environ.get(PROFILE_ENV, "ci")
    settings.load_profile(name)
    return name


def __getattr__(name):
    if name == "strategies":  # imports hypothesis, which pyvl itself does not need
        import importlib

        return importlib.import_module("pyvl.testing.strategies")
    raise AttributeError(name)
