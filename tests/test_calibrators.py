"""Calibration statistics: streaming histograms, range methods, scale/zero-point arithmetic and weight scales.

Pure numpy; every data set is generated from a fixed seed.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from onnxopt.errors import DataError, RecipeError
from onnxopt.passes.quantize import (
    Calibrator,
    GridHistogram,
    TensorRange,
    compute_range,
    dequantize,
    entropy_search,
    fake_quantize,
    qrange,
    quant_params,
    quantize,
    weight_quant_params,
    weight_range,
)

METHOD_NAMES = ("minmax", "percentile", "entropy", "mse")


def laplace_with_outliers(seed: int = 0, n: int = 200_000) -> np.ndarray:
    """Heavy-tailed activations: Laplace(0, 1) plus three far outliers."""
    x = np.random.default_rng(seed).laplace(size=n).astype(np.float32)
    x[[10, 20_000, 150_000]] = [40.0, -35.0, 30.0]
    return x


def fq_mse(x: np.ndarray, rng: TensorRange, dtype: str, symmetric: bool) -> float:
    params = quant_params(rng, dtype, symmetric)
    return float(np.mean(np.square(x.astype(np.float64) - fake_quantize(x, params))))


def calibrated(x: np.ndarray, pieces: int = 7, name: str = "t", **kwargs) -> Calibrator:
    cal = Calibrator(**kwargs)
    for chunk in np.array_split(x, pieces):
        cal.update(name, chunk)
    return cal


# ---------------------------------------------------------------- integer grids, scales, zero points


@pytest.mark.parametrize(
    ("dtype", "symmetric", "reduce_range", "expected", "zero"),
    [
        ("int8", False, False, (-128, 127), None),
        ("int8", True, False, (-127, 127), 0),
        ("int8", False, True, (-64, 63), None),
        ("int8", True, True, (-64, 64), 0),  # as ORT stores reduced int8 weights
        ("uint8", False, False, (0, 255), None),
        ("uint8", True, False, (1, 255), 128),
        ("uint8", False, True, (0, 127), None),
        ("uint8", True, True, (1, 127), 64),
    ],
)
def test_grids_and_symmetric_zero_points(dtype, symmetric, reduce_range, expected, zero):
    assert qrange(dtype, symmetric, reduce_range) == expected
    params = quant_params(TensorRange(-1.0, 3.0), dtype, symmetric, reduce_range)
    assert (params.qmin, params.qmax) == expected
    assert params.dtype == np.dtype(dtype) and params.zero_point.dtype == np.dtype(dtype)
    if symmetric:
        assert int(params.zero_point) == zero
        assert params.scale == np.float32(3.0 / (expected[1] - zero))
    # 0 is always exact, and the range's ends come back within half a step.
    values = np.array([-1.0, 0.0, 3.0], dtype=np.float32)
    back = fake_quantize(values, params)
    assert back[1] == 0.0
    assert np.all(np.abs(back - values) <= params.scale / 2 + 1e-7)


@pytest.mark.parametrize(
    ("dtype", "reduce_range", "scale", "zero"),
    [
        ("uint8", False, 4 / 255, 64),  # round(0 + 1 / (4/255)) = round(63.75)
        ("uint8", True, 4 / 127, 32),  # round(31.75)
        ("int8", False, 4 / 255, -64),  # round(-128 + 63.75)
        ("int8", True, 4 / 127, -32),  # round(-64 + 31.75)
    ],
)
def test_asymmetric_scale_and_zero_point_exact(dtype, reduce_range, scale, zero):
    params = quant_params(TensorRange(-1.0, 3.0), dtype, symmetric=False, reduce_range=reduce_range)
    assert params.scale == np.float32(scale)
    assert int(params.zero_point) == zero
    assert params.scale.ndim == 0 and params.axis is None


def test_ranges_are_widened_to_contain_zero_and_degenerate_ranges_get_scale_one():
    positive = quant_params(TensorRange(2.0, 5.0), "uint8", symmetric=False)
    assert int(positive.zero_point) == 0 and positive.scale == np.float32(5 / 255)
    assert int(quant_params(TensorRange(2.0, 5.0), "int8", symmetric=False).zero_point) == -128
    negative = quant_params(TensorRange(-6.0, -1.0), "uint8", symmetric=False)
    assert int(negative.zero_point) == 255
    for symmetric in (True, False):
        zero = quant_params(TensorRange(0.0, 0.0), "uint8", symmetric)
        assert zero.scale == np.float32(1.0)
        assert fake_quantize(np.zeros(3, np.float32), zero).tolist() == [0.0, 0.0, 0.0]


def test_quantize_rounds_half_to_even_and_saturates_like_quantize_linear():
    params = quant_params(TensorRange(-1.27, 1.27), "int8", symmetric=True)
    step = float(params.scale)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], dtype=np.float32) * np.float32(step)
    x[5:] = [1000.0, -1000.0]
    assert quantize(x, params).tolist() == [0, 2, 2, 0, -2, 127, -127]
    assert quantize(x, params).dtype == np.int8
    assert dequantize(np.array([127], np.int8), params)[0] == pytest.approx(1.27, rel=1e-6)


def test_tensor_range_validates_and_compares():
    with pytest.raises(DataError, match="empty"):
        TensorRange(1.0, 0.0)
    with pytest.raises(DataError, match="finite"):
        TensorRange(0.0, math.inf)
    assert TensorRange(-1, 2) == TensorRange(-1.0, 2.0)
    assert TensorRange(np.array([-1.0, 0.0]), np.array([1.0, 2.0])).per_channel
    assert TensorRange(-3.0, 2.0).absmax == 3.0


# ---------------------------------------------------------------- streaming histograms


@pytest.mark.parametrize("nonnegative", [True, False])
def test_streaming_histogram_equals_one_shot_exactly_in_any_batch_order(nonnegative):
    rng = np.random.default_rng(1)
    # Batches of very different scales and signs, so that the grid widens and slides several times.
    batches = [
        rng.normal(0.0, 0.01, 500),
        rng.normal(3.0, 1.0, 700),
        rng.normal(-40.0, 5.0, 300),
        rng.laplace(size=900),
    ]
    batches = [np.abs(b) if nonnegative else b for b in batches]
    one_shot = GridHistogram(256, nonnegative)
    one_shot.update(np.concatenate(batches))
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        streamed = GridHistogram(256, nonnegative)
        for k in order:
            streamed.update(batches[k])
        assert (streamed.width, streamed.offset) == (one_shot.width, one_shot.offset)
        np.testing.assert_array_equal(streamed.counts, one_shot.counts)
    assert one_shot.total == sum(b.size for b in batches)


def test_rebinning_keeps_every_count_in_the_right_bin():
    rng = np.random.default_rng(2)
    first = rng.uniform(0.0, 1.0, 5000)
    second = rng.uniform(-8.0, 20.0, 5000)
    hist = GridHistogram(128)
    hist.update(first)
    narrow_width = hist.width
    hist.update(second)
    assert hist.width > narrow_width
    data = np.concatenate([first, second])
    # The grid is exact (power-of-two width anchored at 0): np.histogram on the same edges agrees bin by bin.
    np.testing.assert_array_equal(hist.counts, np.histogram(data, bins=hist.edges)[0])
    # The width is the smallest power of two that holds the range in 128 bins.
    assert math.log2(hist.width).is_integer()
    half = hist.width / 2
    assert math.floor(data.max() / half) - math.floor(data.min() / half) + 1 > 128
    assert hist.edges[0] <= data.min() and data.max() < hist.edges[-1]


def test_merged_histograms_equal_one_histogram_of_everything():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 3000), rng.normal(10, 4, 2000)
    left, right, both = GridHistogram(512), GridHistogram(512), GridHistogram(512)
    left.update(a)
    right.update(b)
    both.update(np.concatenate([a, b]))
    left.merge(right)
    np.testing.assert_array_equal(left.counts, both.counts)
    assert (left.width, left.offset) == (both.width, both.offset)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 5e4, 1e-33])
def test_float32_values_are_counted_exactly_like_their_float64_copies(nonnegative, scale):
    """float32 batches are histogrammed in float32 (half the memory traffic); every count must be float64's. The
    tiniest scale takes the float64 fallback (1 / width leaves float32's range)."""
    rng = np.random.default_rng(5)
    batches = [(rng.laplace(size=4000) * scale).astype(np.float32), (rng.normal(2.0, 3.0, 3000) * scale).astype(
        np.float32), np.zeros(50, np.float32)]
    batches = [np.abs(b) if nonnegative else b for b in batches]
    single, double = GridHistogram(512, nonnegative), GridHistogram(512, nonnegative)
    for batch in batches:
        single.update(batch)
        double.update(batch.astype(np.float64))
    assert (single.width, single.offset) == (double.width, double.offset)
    np.testing.assert_array_equal(single.counts, double.counts)
    np.testing.assert_array_equal(single.counts, np.histogram(np.concatenate(batches).astype(np.float64),
                                                              bins=single.edges)[0])


def test_all_zero_batches_before_real_data_are_counted():
    hist, one_shot = GridHistogram(64), GridHistogram(64)
    zeros, data = np.zeros(100), np.random.default_rng(4).normal(size=400)
    hist.update(zeros)
    assert hist.width is None and hist.total == 100
    hist.update(data)
    one_shot.update(np.concatenate([zeros, data]))
    np.testing.assert_array_equal(hist.counts, one_shot.counts)
    assert hist.total == 500


# ---------------------------------------------------------------- calibrator statistics


def test_streaming_minmax_is_exactly_the_one_shot_minmax():
    x = laplace_with_outliers(5).reshape(200, 1000)
    cal = calibrated(x, pieces=13)
    stats = cal.stats("t")
    assert (stats.min, stats.max, stats.count) == (float(x.min()), float(x.max()), x.size)
    assert cal.compute("minmax")["t"] == TensorRange(float(x.min()), float(x.max()))
    assert cal.compute("minmax", symmetric=True)["t"] == TensorRange(-40.0, 40.0)
    assert stats.mean == pytest.approx(float(x.astype(np.float64).mean()), rel=1e-9, abs=1e-12)


def test_streaming_percentile_is_within_one_bin_of_the_exact_percentile():
    x = laplace_with_outliers(6)
    cal = calibrated(x, pieces=9)
    stats = cal.stats("t")
    sym = cal.compute("percentile", symmetric=True, percentile=99.9)["t"]
    assert abs(sym.high - np.percentile(np.abs(x), 99.9)) <= stats.abs_hist.width
    two_sided = cal.compute("percentile", percentile=99.0)["t"]
    width = stats.signed_hist.width
    assert abs(two_sided.low - np.percentile(x, 0.5)) <= width
    assert abs(two_sided.high - np.percentile(x, 99.5)) <= width
    # One-shot over the concatenated data gives the very same statistics, hence the same ranges.
    whole = calibrated(x, pieces=1)
    for method in METHOD_NAMES:
        assert whole.compute(method)["t"] == cal.compute(method)["t"]


def test_entropy_clips_the_outliers_that_minmax_keeps():
    x = laplace_with_outliers(7)
    cal = calibrated(x)
    minmax = cal.compute("minmax", symmetric=True)["t"]
    entropy = cal.compute("entropy", symmetric=True)["t"]
    assert minmax.high == 40.0
    assert 4.0 < entropy.high < 0.5 * minmax.high
    assert fq_mse(x[np.abs(x) < 8], entropy, "int8", True) < fq_mse(x[np.abs(x) < 8], minmax, "int8", True) / 4
    asym = cal.compute("entropy")["t"]
    assert x.min() < asym.low < 0 < asym.high < x.max()


def test_exact_zeros_do_not_drag_the_thresholds_down():
    # ReLU outputs: half the values are exactly 0. Every grid represents 0 exactly, so the searches must find about
    # the same threshold as for the same nonzero values alone (a zero spike spread over a KL group, or counted as
    # rounding noise, would pull it far down).
    normal = np.random.default_rng(17).normal(size=100_000).astype(np.float32)
    relu, half_normal = np.maximum(normal, 0.0), np.abs(normal[normal > 0])
    with_zeros, without = calibrated(relu), calibrated(half_normal)
    assert with_zeros.stats("t").zeros == np.count_nonzero(relu == 0)
    for method in ("entropy", "mse"):
        for symmetric in (True, False):
            high = with_zeros.compute(method, symmetric=symmetric)["t"].high
            assert high == pytest.approx(without.compute(method, symmetric=symmetric)["t"].high, rel=0.1)
            assert high > 0.6 * relu.max()


def test_entropy_search_tries_hundreds_of_thresholds_by_default():
    cal = calibrated(laplace_with_outliers(8))
    search = entropy_search(cal.stats("t").abs_hist)
    assert search.num_quantized_bins == 128
    assert search.candidates > 100
    assert np.all(np.diff(search.thresholds) > 0)
    assert np.all(np.isfinite(search.divergences))
    assert cal.compute("entropy", symmetric=True)["t"].high == search.threshold
    # ONNX Runtime's default (128 bins, 128 levels) leaves a single candidate: the maximum.
    coarse = calibrated(laplace_with_outliers(8), bins=128)
    assert entropy_search(coarse.stats("t").abs_hist).candidates <= 2


def test_mse_range_beats_minmax_on_heavy_tails():
    x = laplace_with_outliers(9)
    cal = calibrated(x)
    for symmetric, dtype in ((True, "int8"), (False, "uint8")):
        mse = cal.compute("mse", symmetric=symmetric)["t"]
        minmax = cal.compute("minmax", symmetric=symmetric)["t"]
        assert mse.high < minmax.high
        assert fq_mse(x, mse, dtype, symmetric) < 0.8 * fq_mse(x, minmax, dtype, symmetric)
    assert cal.compute("sqnr", symmetric=True) == cal.compute("mse", symmetric=True)


def test_mse_range_equals_minmax_on_uniform_data():
    x = np.random.default_rng(10).uniform(-1.0, 1.0, 100_000).astype(np.float32)
    cal = calibrated(x)
    for symmetric, dtype in ((True, "int8"), (False, "uint8")):
        mse = cal.compute("mse", symmetric=symmetric)["t"]
        minmax = cal.compute("minmax", symmetric=symmetric)["t"]
        assert mse.low == pytest.approx(minmax.low, rel=0.01)
        assert mse.high == pytest.approx(minmax.high, rel=0.01)
        assert fq_mse(x, mse, dtype, symmetric) == pytest.approx(fq_mse(x, minmax, dtype, symmetric), rel=0.03)
    relu = np.maximum(x, 0)  # one-sided data: the low end stays at 0
    relu_range = calibrated(relu).compute("mse")["t"]
    assert relu_range.low == 0.0 and relu_range.high == pytest.approx(relu.max(), rel=0.01)


def test_reduce_range_halves_the_levels_the_searches_assume():
    cal = calibrated(laplace_with_outliers(11))
    full = cal.compute("mse", symmetric=True)["t"]
    reduced = cal.compute("mse", symmetric=True, reduce_range=True)["t"]
    assert reduced.high < full.high  # coarser steps: clipping more becomes worth it
    params = cal.quant_params("mse", dtype="int8", symmetric=True, reduce_range=True)["t"]
    assert (params.qmin, params.qmax, int(params.zero_point)) == (-64, 64, 0)  # ORT's reduced int8 grid
    assert params.scale == np.float32(reduced.high / 64)


def test_every_method_handles_constant_and_zero_tensors():
    cal = Calibrator(64)
    cal.update("zeros", np.zeros((2, 3), np.float32))
    cal.update("const", np.full(50, 3.0, np.float32))
    cal.update("ints", np.arange(-5, 6, dtype=np.int64))
    for method in METHOD_NAMES:
        for symmetric in (True, False):
            ranges = cal.compute(method, symmetric=symmetric)
            assert ranges["zeros"] == TensorRange(0.0, 0.0)
            assert 0.0 < ranges["const"].high <= 3.0
            assert ranges["ints"].high <= 5.0
            for params in cal.quant_params(method, symmetric=symmetric).values():
                assert np.isfinite(params.scale) and params.scale > 0


def test_results_are_deterministic_and_independent_of_batching():
    x = laplace_with_outliers(12).reshape(50, -1)
    forward = calibrated(x, pieces=5)
    backward = Calibrator()
    for chunk in reversed(np.array_split(x, 11)):
        backward.update("t", chunk)
    for method in METHOD_NAMES:
        for symmetric in (True, False):
            first = forward.compute(method, symmetric=symmetric)
            assert first == forward.compute(method, symmetric=symmetric)
            assert first == backward.compute(method, symmetric=symmetric)


def test_memory_is_bounded_by_tensors_times_bins():
    cal = Calibrator(256)
    rng = np.random.default_rng(13)
    for step in range(20):  # ever wider data: the histograms re-bin, they never grow
        cal.update_many({f"t{k}": rng.normal(0.0, 2.0**step, 1000) for k in range(3)})
    assert len(cal) == 3 and cal.names == ["t0", "t1", "t2"]
    assert cal.nbytes == 3 * 2 * 256 * 8
    assert all(cal.stats(name).count == 20_000 for name in cal.names)
    assert Calibrator(256, histograms=False).nbytes == 0


def test_calibrators_merge_exactly():
    x = laplace_with_outliers(14)
    a, b = Calibrator(), Calibrator()
    a.update("t", x[:70_000])
    b.update("t", x[70_000:])
    b.update("only_b", x[:10])
    a.merge(b)
    whole = calibrated(x, pieces=1)
    assert a.compute("entropy")["t"] == whole.compute("entropy")["t"]
    assert "only_b" in a


def test_user_errors_name_the_tensor_or_option():
    cal = Calibrator()
    with pytest.raises(DataError, match="'act'.*NaN/Inf"):
        cal.update("act", np.array([1.0, np.nan], np.float32))
    with pytest.raises(DataError, match="'missing'"):
        cal.compute("minmax", names=["missing"])
    cal.update("x", np.ones(4, np.float32))
    with pytest.raises(RecipeError, match="unknown calibration method 'kl'"):
        cal.compute("kl")
    with pytest.raises(RecipeError, match="no option"):
        cal.compute("mse", percentile=99.0)
    with pytest.raises(RecipeError, match="percentile"):
        cal.compute("percentile", percentile=120)
    with pytest.raises(RecipeError, match="histograms"):
        minmax_only = Calibrator(histograms=False)
        minmax_only.update("x", np.ones(4))
        minmax_only.compute("entropy")
    with pytest.raises(RecipeError, match="bin count"):
        Calibrator(bins=4)
    with pytest.raises(RecipeError, match="dtype"):
        quant_params(TensorRange(-1, 1), "int4")
    empty = Calibrator()
    empty.update("e", np.zeros((0, 3), np.float32))
    with pytest.raises(DataError, match="'e' received no values"):
        empty.compute()
    assert compute_range(cal.stats("x"), "minmax") == TensorRange(1.0, 1.0)


# ---------------------------------------------------------------- weights


def conv_weight(seed: int = 15) -> np.ndarray:
    w = np.random.default_rng(seed).normal(0.0, 0.1, (6, 4, 3, 3)).astype(np.float32)
    w[2] *= 5.0  # channels of very different magnitudes: where per-channel scales matter
    w[4, 0, 0, 0] = 3.0  # one outlier weight in channel 4
    return w


def test_per_channel_minmax_scales_match_hand_computation():
    w = conv_weight()
    params = weight_quant_params(w, axis=0)
    expected = np.abs(w).reshape(6, -1).max(axis=1) / 127
    np.testing.assert_array_equal(params.scale, expected.astype(np.float32))
    assert params.zero_point.tolist() == [0] * 6 and params.axis == 0 and params.dtype == np.int8
    per_tensor = weight_quant_params(w)
    assert per_tensor.scale == np.float32(np.abs(w).max() / 127) and not per_tensor.per_channel
    # Each channel comes back within half of its own step; per channel beats per tensor.
    err = np.abs(fake_quantize(w, params) - w).reshape(6, -1).max(axis=1)
    assert np.all(err <= params.scale / 2 * (1 + 1e-6))
    assert np.mean((fake_quantize(w, params) - w) ** 2) < np.mean((fake_quantize(w, per_tensor) - w) ** 2)


def test_per_channel_asymmetric_and_reduced_weight_scales():
    w = conv_weight()
    wt = np.ascontiguousarray(np.moveaxis(w, 0, 1))  # channels on axis 1, as in a transposed Gemm weight
    params = weight_quant_params(wt, axis=1, dtype="uint8", symmetric=False)
    rows = w.reshape(6, -1).astype(np.float64)
    low, high = np.minimum(rows.min(axis=1), 0), np.maximum(rows.max(axis=1), 0)
    scale = ((high - low) / 255).astype(np.float32)
    np.testing.assert_array_equal(params.scale, scale)
    np.testing.assert_array_equal(params.zero_point, np.round(-low / scale.astype(np.float64)).astype(np.uint8))
    assert fake_quantize(wt, params).shape == wt.shape
    reduced = weight_quant_params(w, axis=0, reduce_range=True)
    np.testing.assert_array_equal(reduced.scale, (np.abs(rows).max(axis=1) / 64).astype(np.float32))
    q = quantize(w, reduced)
    assert q.min() >= -64 and q.max() <= 64 and np.abs(q).max() == 64


def test_mse_weight_scales_never_lose_to_minmax_and_clip_heavy_tails():
    # Heavy-tailed (Laplace) rows with a large fan-in: a slightly tighter clip pays off. With 8 bits and a few hundred
    # weights per channel the MSE-optimal range stays within a few % of minmax: clipping one weight costs its whole
    # excess squared, while it saves only (step^2 / 12) per weight.
    w = np.random.default_rng(16).laplace(0.0, 0.05, (8, 2048)).astype(np.float32)
    w[3, 7] = 1.5  # a single far outlier: clipping it would cost more than it saves
    minmax = weight_quant_params(w, axis=0)
    mse = weight_quant_params(w, axis=0, method="mse")

    def channel_errors(params):
        return np.sum((fake_quantize(w, params) - w).astype(np.float64) ** 2, axis=1)

    assert np.all(channel_errors(mse) <= channel_errors(minmax))
    assert np.sum(channel_errors(mse)) < np.sum(channel_errors(minmax))
    assert np.all(mse.scale <= minmax.scale) and np.count_nonzero(mse.scale < minmax.scale) >= 6
    assert mse.scale[3] > 0.95 * minmax.scale[3]
    rng = weight_range(w, axis=0, method="percentile", percentile=100.0)
    np.testing.assert_allclose(rng.high, np.abs(w).max(axis=1))
    assert weight_range(w, method="sqnr") == weight_range(w, method="mse")


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 2, 2)])
def test_minmax_weight_range_reduces_in_place_like_the_channel_rows(shape):
    """minmax reduces over the other axes of the weight itself: the same extremes as the rows that the other
    methods build (a transposed copy), for every axis, and NaN/Inf refused on every path."""
    from onnxopt.passes.quantize.weights import _channel_rows

    w = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    for axis in [None, *range(-len(shape), len(shape))]:
        for symmetric in (True, False):
            rows = _channel_rows(w, axis, "w")
            low, high = rows.min(axis=1), rows.max(axis=1)
            if symmetric:
                high = np.maximum(-low, high)
                low = -high
            got = weight_range(w, axis=axis, symmetric=symmetric)
            if axis is None:
                assert (got.low, got.high) == (float(low[0]), float(high[0]))
            else:
                assert np.array_equal(got.low, low) and np.array_equal(got.high, high)
    for bad in (np.nan, np.inf, -np.inf):
        broken = w.copy()
        broken.flat[len(broken.flat) // 2] = bad
        for axis in (None, 0, -1):
            with pytest.raises(DataError, match="NaN/Inf"):
                weight_range(broken, axis=axis)


def test_weight_errors():
    with pytest.raises(RecipeError, match="entropy needs activation histograms"):
        weight_range(np.ones(3), method="entropy")
    with pytest.raises(DataError, match="'fc.w'.*NaN"):
        weight_quant_params(np.array([1.0, np.inf]), name="fc.w")
    with pytest.raises(DataError, match="axis 4"):
        weight_quant_params(np.ones((2, 2)), axis=4)
    params = weight_quant_params(np.ones((3, 2)), axis=0)
    with pytest.raises(DataError, match="4 channels on axis 1 but the parameters have 3"):
        fake_quantize(np.ones((2, 4)), params, axis=1)


def test_symmetric_grids_match_onnx_runtimes_quantizer():
    """The grids we mirror must be the ones ORT writes: reduced int8 weights are -64..64 there, not -63..63."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    for reduce_range in (False, True):
        ort_min, ort_max = get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range=reduce_range, symmetric=True)
        assert qrange("int8", True, reduce_range) == (int(ort_min), int(ort_max))
