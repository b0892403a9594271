"""onnxopt: make a trained ONNX network small and fast after training.

Heavy modules (torch, matplotlib) are imported lazily; importing ``onnxopt`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "optimize"]

if TYPE_CHECKING:  # pragma: no cover
    from onnxopt.api import optimize


def __getattr__(name: str) -> Any:
    if name == "optimize":
        from onnxopt.api import optimize

        return optimize
    raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
