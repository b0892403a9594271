"""Training data for distillation: the user's data source read into arrays once (a few thousand images at most),
labels kept where present; a label of -1 marks an unlabelled sample (teacher outputs only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec

#: augment(inputs, rng) -> inputs, applied to each training batch before student and teacher see it.
AugmentFn = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


@dataclass
class TrainData:
    """Arrays keyed by input name (leading sample dim) and optional int64 labels (-1 = unlabelled)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        sizes = {k: len(v) for k, v in self.inputs.items()}
        if not sizes or 0 in sizes.values():
            raise DataError("training data is empty")
        if len(set(sizes.values())) != 1:
            raise DataError(f"training inputs have different sample counts: {sizes}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels).astype(np.int64).reshape(-1)
            if len(self.labels) != len(self):
                raise DataError(f"{len(self.labels)} labels for {len(self)} samples")
            if not (self.labels >= 0).any():
                self.labels = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def num_labelled(self) -> int:
        return 0 if self.labels is None else int((self.labels >= 0).sum())

    def take(self, index: np.ndarray) -> "TrainData":
        return TrainData({k: v[index] for k, v in self.inputs.items()},
                         None if self.labels is None else self.labels[index])

    def describe(self) -> str:
        labelled = self.num_labelled
        what = "unlabelled" if not labelled else "labelled" if labelled == len(self) else f"{labelled} labelled"
        return f"{len(self)} samples ({what})"


def split_holdout(data: TrainData, fraction: float, seed: int) -> tuple[TrainData, TrainData]:
    """``(train, holdout)``: a seeded slice of ``fraction`` of the samples, stratified by label where there are
    labels (each class keeps its share, at least one sample of a class with two or more), for picking the kept epoch
    without touching the data a pipeline judges its budgets on."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    labels = data.labels if data.labels is not None else np.full(len(data), -1, dtype=np.int64)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) >= 2:
            held.append(members[:max(1, int(round(fraction * len(members))))])
    hold = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    if len(hold) == 0 or len(hold) == len(data):
        raise DataError(f"{len(data)} training samples are too few to hold out {fraction:.0%} for epoch selection")
    keep = np.setdiff1d(np.arange(len(data)), hold)
    return data.take(keep), data.take(hold)


def load(source: object, specs: Sequence[InputSpec], *, max_samples: int | None = None,
         what: str = "training data") -> TrainData:
    """Read a :class:`onnxopt.calib_data.DataSource` (or anything ``open_data`` accepts) into a :class:`TrainData`;
    the source validates shapes and dtypes against ``specs`` (the student's inputs)."""
    from onnxopt.calib_data import DataSource, open_data

    data = source if isinstance(source, DataSource) else open_data(source)
    if isinstance(data, TrainData):  # pragma: no cover - open_data never returns one
        return data
    chunks: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    labels: list[np.ndarray] = []
    count = 0
    unlabelled = False
    for batch in data.iter_batches(specs, batch_size=256):
        if batch.is_feed:
            raise DataError(f"{what} ({data.description}) is a stack of whole feeds for a model without a batch "
                            "axis: training draws mini-batches along a batch axis")
        take = batch.size if max_samples is None else min(batch.size, max_samples - count)
        for name, array in batch.inputs.items():
            chunks[name].append(np.asarray(array[:take]))
        if batch.labels is None:
            unlabelled = True
        else:
            labels.append(np.asarray(batch.labels[:take]))
        count += take
        if max_samples is not None and count >= max_samples:
            break
    if count == 0:
        raise DataError(f"{what} is empty")
    arrays = {k: np.concatenate(v) for k, v in chunks.items()}
    return TrainData(arrays, None if unlabelled or not labels else np.concatenate(labels))


def merge(labelled: TrainData, unlabelled: TrainData) -> TrainData:
    """One training set from a labelled one and an unlabelled pool (whose samples get label -1)."""
    if set(labelled.inputs) != set(unlabelled.inputs):
        raise DataError(f"unlabelled data has inputs {sorted(unlabelled.inputs)}, "
                        f"training data {sorted(labelled.inputs)}")
    inputs = {k: np.concatenate([v, unlabelled.inputs[k]]) for k, v in labelled.inputs.items()}
    first = labelled.labels if labelled.labels is not None else np.full(len(labelled), -1, np.int64)
    return TrainData(inputs, np.concatenate([first, np.full(len(unlabelled), -1, np.int64)]))


# --------------------------------------------------------------------------------------------------- augmentation


def _on_images(transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> AugmentFn:
    """Apply ``transform`` to every NCHW input of a batch; other inputs pass unchanged."""

    def apply(inputs: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {name: transform(x, rng) if x.ndim == 4 else x for name, x in inputs.items()}

    return apply


def random_shift(max_pixels: int = 2) -> AugmentFn:
    """Shift every image of NCHW inputs by up to ``max_pixels`` in each direction (zero fill): digit-style jitter."""

    def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        moved = np.zeros_like(x)
        h, w = x.shape[2], x.shape[3]
        for i in range(len(x)):
            dy, dx = (int(v) for v in rng.integers(-max_pixels, max_pixels + 1, size=2))
            moved[i, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                x[i, :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        return moved

    return _on_images(shift)


def random_flip(p: float = 0.5) -> AugmentFn:
    """Mirror NCHW images left-right with probability ``p`` (not for digits or text, whose meaning flips)."""

    def flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mask = rng.random(len(x)) < p
        x = x.copy()
        x[mask] = x[mask][..., ::-1]
        return x

    return _on_images(flip)


def make_augment(spec: str | None) -> AugmentFn | None:
    """``"shift"``, ``"shift:3"``, ``"flip"``, ``"shift+flip"`` or None/``"none"`` -> an augmentation callable."""
    if not spec or spec == "none":
        return None
    steps = []
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name == "shift":
            steps.append(random_shift(int(arg) if arg else 2))
        elif name == "flip":
            steps.append(random_flip(float(arg) if arg else 0.5))
        else:
            raise ValueError(f"unknown augmentation {name!r} (known: shift[:PIXELS], flip[:P], none)")

    def chain(inputs: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        for step in steps:
            inputs = step(inputs, rng)
        return inputs

    return chain

