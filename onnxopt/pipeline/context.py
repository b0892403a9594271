"""What a pass may need beyond the model: data, shapes, seed, the original model, runtime settings."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir as ir

    from onnxopt.calib_data.base import DataSource

T = TypeVar("T")


@dataclass
class PassContext:
    """Shared by every pass of a run; a pass used alone gets a default context."""

    calib: DataSource | None = None
    eval: DataSource | None = None
    #: Fixed shapes for dynamic inputs, from ``--input-shape`` or the data.
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    #: The model as the user gave it (teacher for distillation, reference for fidelity).
    original: ir.Model | None = None
    provider: str = "cpu"
    threads: int | None = None
    quiet: bool = True
    workdir: Path | None = None
    #: Budgets by name (e.g. ``accuracy_drop``) for passes that trade accuracy for speed.
    budgets: dict[str, float] = field(default_factory=dict)

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterator[T]:
        """A tqdm bar on stderr unless quiet."""
        if self.quiet:
            yield from iterable
            return
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, leave=False, **kwargs)
