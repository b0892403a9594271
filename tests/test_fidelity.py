"""Fidelity figures: errors, SQNR, top-1 agreement and accuracy, accumulated over batches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxopt.fidelity import AccuracyAccumulator, FidelityAccumulator, is_score_vector


def test_identical_outputs():
    acc = FidelityAccumulator(["y"])
    ref = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    acc.update([ref], [ref.copy()])
    result = acc.result()
    assert result.max_abs_error == 0 and result.sqnr_db == math.inf and result.top1_agreement == 1.0
    assert result.to_dict()["sqnr_db"] == "inf"


def test_figures_accumulate_over_batches():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(8, 4))
    noise = rng.normal(scale=0.1, size=(8, 4))
    whole = FidelityAccumulator(["y"])
    whole.update([ref], [ref + noise])
    split = FidelityAccumulator(["y"])
    split.update([ref[:3]], [ref[:3] + noise[:3]])
    split.update([ref[3:]], [ref[3:] + noise[3:]])
    a, b = whole.result(), split.result()
    assert a.max_abs_error == pytest.approx(np.abs(noise).max())
    assert a.max_rel_error == pytest.approx(np.abs(noise).max() / np.abs(ref).max())
    assert a.sqnr_db == pytest.approx(10 * np.log10((ref**2).sum() / (noise**2).sum()))
    assert (a.max_abs_error, a.sqnr_db, a.top1_agreement, a.samples) == (b.max_abs_error, pytest.approx(b.sqnr_db),
                                                                         b.top1_agreement, b.samples)


def test_top1_agreement_on_nchw_scores():
    """[N, C, 1, 1] score maps (Caffe2-era classifiers) count one agreement per sample."""
    ref = np.zeros((4, 10, 1, 1), np.float32)
    ref[np.arange(4), [1, 2, 3, 4]] = 1.0
    out = ref.copy()
    out[0, 1], out[0, 7] = 0.0, 1.0  # one sample flips
    acc = FidelityAccumulator(["prob"])
    acc.update([ref], [out])
    assert acc.result().top1_agreement == 0.75
    accuracy = AccuracyAccumulator()
    accuracy.update(ref, np.array([1, 2, 3, 0]))
    assert accuracy.value == 0.75


def test_non_score_outputs_have_no_agreement():
    assert not is_score_vector(np.zeros((2, 1, 8, 8), np.float32))
    assert is_score_vector(np.zeros((2, 5), np.float32))
    acc = FidelityAccumulator(["map"])
    acc.update([np.ones((2, 1, 8, 8))], [np.ones((2, 1, 8, 8))])
    assert acc.result().top1_agreement is None


def test_nan_output_is_infinite_error_and_shape_change_is_refused():
    acc = FidelityAccumulator(["y"])
    acc.update([np.ones((2, 3))], [np.array([[1, np.nan, 1], [1, 1, 1]])])
    assert acc.result().max_abs_error == math.inf
    with pytest.raises(ValueError, match="changed shape"):
        FidelityAccumulator(["y"]).update([np.ones((2, 3))], [np.ones((2, 4))])


def test_reference_infinities_must_be_matched_exactly():
    """A model whose own outputs hold -inf/NaN on the data (log(0), a masked score): the same values in the
    candidate agree and are left out of the figures; a different value there, or a new one elsewhere, is an
    infinite error."""
    ref = np.array([[-np.inf, 1.0, 2.0], [np.nan, 3.0, -1.0]], np.float32)
    same = FidelityAccumulator(["y"])
    same.update([ref], [ref.copy()])
    assert same.result().max_abs_error == 0.0 and same.result().sqnr_db == math.inf
    close = FidelityAccumulator(["y"])
    close.update([ref], [np.array([[-np.inf, 1.5, 2.0], [np.nan, 3.0, -1.0]], np.float32)])
    assert close.result().max_abs_error == pytest.approx(0.5)
    for bad in ([[np.inf, 1.0, 2.0], [np.nan, 3.0, -1.0]], [[-np.inf, 1.0, 2.0], [0.0, 3.0, -1.0]],
                [[-np.inf, np.inf, 2.0], [np.nan, 3.0, -1.0]]):
        accumulator = FidelityAccumulator(["y"])
        accumulator.update([ref], [np.array(bad, np.float32)])
        assert accumulator.result().max_abs_error == math.inf
