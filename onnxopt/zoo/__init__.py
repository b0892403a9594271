"""The example zoo: small trained image classifiers (``models/``) and the torch nets they come from
(:mod:`onnxopt.zoo.nets`).

``examples/build_zoo.py`` trains every net of :mod:`onnxopt.zoo.nets` on scikit-learn's digits and writes
``models/<name>.onnx``, ``models/<name>.pt`` (the torch ``state_dict``) and ``models/zoo.json`` (params, MACs,
accuracy, SHA-256). :mod:`onnxopt.zoo.nets` imports torch at module level; this package itself does not (only
:func:`load_torch` does, when called), so importing ``onnxopt.zoo`` stays cheap and torch remains optional.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from onnxopt.errors import BadInputError

MODELS_DIR = Path(__file__).resolve().parent / "models"
INFO_FILE = "zoo.json"

__all__ = ["MODELS_DIR", "info", "load_torch", "model_path", "names", "state_dict_path"]


@lru_cache(maxsize=1)
def _info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BadInputError(f"the example zoo's index {path} is missing from this installation "
                            "(rebuild it with 'python examples/build_zoo.py' from a source checkout)")
    return json.loads(path.read_text())


def info() -> dict[str, Any]:
    """The parsed ``zoo.json``: data, training recipe, versions and per model params, MACs, accuracy, hashes."""
    return _info(MODELS_DIR / INFO_FILE)


def names() -> list[str]:
    """The zoo's model names, e.g. ``["mobilenetv2", "shufflenetv2", "mnasnet", "resnet", "vgg"]``."""
    return list(info()["models"])


def _record(name: str) -> dict[str, Any]:
    models = info()["models"]
    if name not in models:
        raise BadInputError(f"unknown zoo model '{name}' (known: {', '.join(models)})")
    return models[name]


def _file(name: str, key: str) -> Path:
    path = MODELS_DIR / _record(name)[key]
    if not path.is_file():
        raise BadInputError(f"zoo file {path} is missing (rebuild it with 'python examples/build_zoo.py')")
    return path


def model_path(name: str) -> Path:
    """The ONNX file of zoo model ``name`` (input ``input`` ``[batch, 3, 32, 32]``, output ``logits``)."""
    return _file(name, "onnx")


def state_dict_path(name: str) -> Path:
    """The trained torch ``state_dict`` of zoo model ``name`` (``torch.load(..., weights_only=True)``)."""
    return _file(name, "state_dict")


def load_torch(name: str) -> Any:
    """Zoo model ``name`` as a torch module in eval mode, with its trained weights (imports torch)."""
    import torch

    from onnxopt.zoo import nets

    record = _record(name)
    net = nets.build(record["builder"], **record["options"])
    net.load_state_dict(torch.load(state_dict_path(name), map_location="cpu", weights_only=True))
    return net.eval()
