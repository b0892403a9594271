"""placement=auto's last resort: the fewest most sensitive layers kept FP32 that let a faster int8 model pass.

When every int8 candidate faster than FP32 fails its checks (top-1 agreement, the SQNR of an output without classes,
an accuracy budget), the search would keep the model in FP32. On PaddleOCR's v4 text detector all ten candidates
stayed at 9-14 dB against the 20 dB bar while int8 ran about twice as fast; its error comes mostly from a few
layers (a depthwise conv fed by hard-swish channels of very unequal range among them). So the layers are ranked by
the simulated sensitivity table (:mod:`onnxopt.passes.quantize.sensitivity`: one layer fake-quantized at a time),
and the smallest number ``k`` of the most sensitive ones left FP32 that makes a Conv/Gemm/MatMul-only candidate pass
is found by bisection, trusting that more FP32 layers never hurt; at most half of the layers, beyond which int8 has
little left to win. Below the number that order needed, a second order is bisected: the noise each layer adds in
the all-int8 model (:func:`~onnxopt.passes.quantize.sensitivity.added_noise_ranking`), which sees a layer amid the
others' noise; on the v4 detector it needed 16 layers where the table's order needed 22. The candidates found are
then timed against FP32 like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: At most this fraction of the quantizable layers is kept FP32 by the fallback.
MAX_FP32_FRACTION = 0.5
#: Samples the sensitivity ranking runs on (an order, not a verdict: the bisection checks real int8 models).
RANKING_SAMPLES = 16
#: Above this many bytes of weights the fallback is skipped (with a note): its ranking makes one ORT session of the
#: whole model per layer, which on a model this size takes minutes.
MAX_WEIGHT_BYTES = 256 << 20


@dataclass
class Bisection:
    """The smallest passing ``k`` (None: not even ``cap`` passes) and every ``k`` tried, in order, with its result."""

    found: int | None
    trials: list[tuple[int, bool]] = field(default_factory=list)


def fewest_passing(cap: int, passes: Callable[[int], bool]) -> Bisection:
    """The smallest ``k`` in ``[1, cap]`` with ``passes(k)``, assuming ``passes`` is monotone and ``passes(0)`` is
    false (the candidates with no layer kept FP32 have failed already); ``cap`` is tried first, so a hopeless search
    costs one check."""
    result = Bisection(None)
    if cap < 1:
        return result

    def check(k: int) -> bool:
        ok = passes(k)
        result.trials.append((k, ok))
        return ok

    if not check(cap):
        return result
    low, high = 0, cap  # passes(low) is false, passes(high) true
    while high - low > 1:
        mid = (low + high) // 2
        if check(mid):
            high = mid
        else:
            low = mid
    result.found = high
    return result


def fp32_cap(layers: int) -> int:
    """How many of ``layers`` quantizable layers the fallback may keep FP32."""
    return int(layers * MAX_FP32_FRACTION)


__all__ = ["MAX_FP32_FRACTION", "MAX_WEIGHT_BYTES", "RANKING_SAMPLES", "Bisection", "fewest_passing", "fp32_cap"]
