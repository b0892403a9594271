"""Automatic teacher/student layer pairing for feature losses, by spatial resolution.

Two unrelated architectures share no layer names, but both downsample an image through the same ladder of
resolutions (32x32, 16x16, 8x8, ...). A probe forward pass records the shape of every 4-D value; for each resolution
both networks reach, the last value at that resolution (the stage's output) is paired, and the first one too for FSP
matrices, which relate a stage's input and output. Resolutions of 1x1 (after global pooling) are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Stage:
    """The values of one network at one spatial resolution, in topological order (first and last kept)."""

    resolution: tuple[int, int]
    first: str
    first_channels: int
    last: str
    last_channels: int


@dataclass(frozen=True)
class StagePair:
    """A student stage and a teacher stage at the same resolution."""

    resolution: tuple[int, int]
    student: Stage
    teacher: Stage

    def to_dict(self) -> dict[str, object]:
        return {"resolution": list(self.resolution), "student": [self.student.first, self.student.last],
                "teacher": [self.teacher.first, self.teacher.last],
                "channels": [self.student.last_channels, self.teacher.last_channels]}


def stages(values: Sequence[tuple[str, Shape]], batch: int | None = None) -> dict[tuple[int, int], Stage]:
    """Group ``(name, shape)`` values (topological order) into stages by resolution.

    Only 4-D values count, and only those whose leading dim is ``batch`` when given (which drops weights that a
    probe may list, e.g. Constant outputs of a Paddle graph).
    """
    found: dict[tuple[int, int], Stage] = {}
    for name, shape in values:
        if len(shape) != 4 or (batch is not None and shape[0] != batch):
            continue
        resolution = (int(shape[2]), int(shape[3]))
        if resolution == (1, 1):
            continue
        if resolution not in found:
            found[resolution] = Stage(resolution, name, int(shape[1]), name, int(shape[1]))
        else:
            found[resolution] = Stage(resolution, found[resolution].first, found[resolution].first_channels, name,
                                      int(shape[1]))
    return found


def match_by_resolution(student: Sequence[tuple[str, Shape]], teacher: Sequence[tuple[str, Shape]],
                        batch: int | None = None, max_pairs: int = 3) -> list[StagePair]:
    """Pairs of stages at resolutions both networks reach, deepest (smallest) resolutions first kept when there are
    more than ``max_pairs``; returned from the largest resolution down. Empty when the networks share none."""
    s_stages, t_stages = stages(student, batch), stages(teacher, batch)
    common = sorted(set(s_stages) & set(t_stages), key=lambda r: r[0] * r[1])[:max_pairs]
    common.sort(key=lambda r: -r[0] * r[1])
    return [StagePair(r, s_stages[r], t_stages[r]) for r in common]
