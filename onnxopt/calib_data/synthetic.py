"""Random inputs of the right shape and dtype: enough to check that a model still runs and computes the same thing.

Flagged ``synthetic`` so reports say that accuracy was not measured. Each sample is drawn from a generator seeded by
``(seed, sample index)``, so the values do not depend on the batch size and two iterations are identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from onnxopt.calib_data.stream import Chunk, ChunkedSource
from onnxopt.calib_data.validate import fixed_batch_size, format_model_shape
from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec

DEFAULT_SAMPLES = 8


class RandomSource(ChunkedSource):
    """``num_samples`` random samples: floats ~ N(0, 1), uint8 in 0..255, other integers in 0..9, random bools.

    Dynamic dims other than the batch dim need a shape from ``input_shapes`` (the full input shape, batch dim first,
    as ``--input-shape`` gives it). A model with a fixed batch size larger than ``num_samples`` gets one full batch.
    """

    synthetic = True

    def __init__(self, num_samples: int = DEFAULT_SAMPLES, *, seed: int = 0,
                 input_shapes: Mapping[str, Sequence[int]] | None = None):
        if int(num_samples) < 1:
            raise DataError(f"random data needs at least 1 sample, got {num_samples}")
        self._count = int(num_samples)
        self.seed = int(seed)
        self.input_shapes = {name: tuple(int(d) for d in shape) for name, shape in (input_shapes or {}).items()}
        self.where = "random data"

    def num_samples(self) -> int | None:
        return self._count

    def has_labels(self) -> bool:
        return False

    @property
    def description(self) -> str:  # type: ignore[override]
        return (f"random data ({self._count} samples, seed {self.seed}, unlabelled; synthetic: structural checks "
                f"only)")

    def sample_shape(self, spec: InputSpec) -> tuple[int, ...]:
        """The shape of one sample (without the batch dim) for ``spec``."""
        given = self.input_shapes.get(spec.name)
        flag = f"--input-shape {spec.name}:D0,D1,..."
        if given is not None:
            if any(d <= 0 for d in given):
                raise DataError(f"random data: the shape {given} given for input '{spec.name}' has a dim <= 0")
            if spec.shape and len(given) == len(spec.shape) - 1:
                return given
            if spec.shape and len(given) != len(spec.shape):
                raise DataError(f"random data: the shape {given} given for input '{spec.name}' has rank {len(given)}, "
                                f"the model input {format_model_shape(spec.shape)} has rank {len(spec.shape)}")
            if not given:
                raise DataError(f"random data: the shape given for input '{spec.name}' is empty")
            return given[1:]
        if not spec.shape:
            raise DataError(f"random data: input '{spec.name}' has no known shape; give one with input_shapes "
                            f"({flag})")
        dims = spec.shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise DataError(f"random data: input '{spec.name}' has dynamic dims {format_model_shape(spec.shape)}; "
                            f"give its shape with input_shapes ({flag})")
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]

    def _chunks(self, specs: Sequence[InputSpec], chunk_size: int) -> Iterator[Chunk]:
        shapes = {spec.name: self.sample_shape(spec) for spec in specs}
        total = max(self._count, fixed_batch_size(specs) or 1)
        for index in range(total):
            rng = np.random.default_rng([self.seed, index])
            arrays = {spec.name: _draw(rng, (1, *shapes[spec.name]), spec) for spec in specs}
            yield Chunk(arrays, None, f"sample {index}")


def _draw(rng: np.random.Generator, shape: tuple[int, ...], spec: InputSpec) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype.kind in "iu":
        return rng.integers(0, 10, shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    raise DataError(f"random data: input '{spec.name}' has type {dtype}, for which no random data is generated; "
                    f"give real data")


def random_data(num_samples: int = DEFAULT_SAMPLES, *, seed: int = 0,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> RandomSource:
    """Random data for structural checks (see :class:`RandomSource`)."""
    return RandomSource(num_samples, seed=seed, input_shapes=input_shapes)


__all__ = ["DEFAULT_SAMPLES", "RandomSource", "random_data"]
