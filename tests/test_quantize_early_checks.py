"""A candidate's check stops once it can no longer pass (PrefixCheck), and a staged search whose whole-model
candidates failed their checks checks the regions before timing them: the same verdicts, sooner."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_builders import outlier_net

from onnxopt.calib_data import open_data
from onnxopt.modelio import as_ir_model, to_proto
from onnxopt.passes.quantize import QuantizePass, placement
from onnxopt.passes.quantize.agreement import PrefixCheck, output_sqnr_db, top1_agreement


def _full_verdict(reference, outputs, kind, axis, min_sqnr_db, min_agreement) -> bool:
    """The full check's pass/fail, as Trial.vet judges it."""
    if output_sqnr_db(reference, outputs) < min_sqnr_db:
        return False
    return kind == "sqnr" or top1_agreement(reference, outputs, axis) >= min_agreement


@pytest.mark.parametrize("kind, axis, shape", [("sqnr", None, (1, 1, 6, 6)), ("top-1", None, (1, 10)),
                                               ("top-1 per position", 2, (1, 12, 7))])
def test_a_stop_is_always_a_failure_of_the_full_check(kind, axis, shape):
    """Soundness over many random candidates: whenever the prefix check gives up, the full check fails too; a
    candidate that passes the full check is never stopped."""
    rng = np.random.default_rng(0)
    stopped_some = passed_some = False
    for trial in range(300):
        reference = [rng.normal(size=shape).astype(np.float32) for _ in range(16)]
        noise = rng.uniform(0.01, 0.6)
        outputs = [r + rng.normal(scale=noise * rng.uniform(0, 2), size=shape).astype(np.float32) for r in reference]
        min_sqnr, min_agreement = (20.0, None) if kind == "sqnr" else (10.0, 0.9)
        check = PrefixCheck(reference, kind, axis, min_sqnr, min_agreement)
        stop = next((i for i, out in enumerate(outputs) if check.add(out)), None)
        full = _full_verdict(reference, outputs, kind, axis, min_sqnr, min_agreement or 0.0)
        if stop is not None:
            assert not full, f"trial {trial}: stopped after {stop + 1} samples but the full check passes"
            stopped_some = True
        passed_some |= full
    assert stopped_some and passed_some  # both cases were exercised


def test_prefix_check_reports_what_it_has_seen_and_the_bound():
    reference = [np.ones((1, 4), np.float32) for _ in range(10)]
    check = PrefixCheck(reference, "sqnr", None, 20.0)
    assert check.add(np.ones((1, 4), np.float32)) is None and check.figures()[0] == np.inf
    reason = check.add(np.full((1, 4), 1.5, np.float32))  # noise 4 x 0.25 = 1 against a total signal of 40
    assert reason == "SQNR at most 16.02 dB < 20 dB"
    assert check.figures(seen_only=True)[0] == pytest.approx(10 * np.log10(8 / 1))  # the two samples seen
    nan = PrefixCheck(reference, "sqnr", None, 20.0)
    assert nan.add(np.full((1, 4), np.nan, np.float32)) == "its output is not finite"


def test_top1_bound_counts_every_decision_left():
    reference = [np.eye(1, 5, k=0, dtype=np.float32) for _ in range(10)]  # class 0, ten samples
    check = PrefixCheck(reference, "top-1", None, -np.inf, 0.9)  # no SQNR floor here
    wrong = np.eye(1, 5, k=1, dtype=np.float32)
    assert check.add(wrong) is None  # 9 of 10 may still agree: 0.9 is reachable
    assert check.add(wrong) == "top-1 agreement at most 0.8000 < 0.9"
    assert check.figures(seen_only=True)[1] == 0.0 and check.figures()[1] == 0.8


def test_a_batched_output_that_does_not_line_up_leaves_the_verdict_to_the_full_check():
    reference = [np.ones((1, 4), np.float32) for _ in range(4)]
    check = PrefixCheck(reference, "sqnr", None, 20.0)
    assert check.add(np.zeros((3, 5), np.float32)) is None
    assert check.add(np.zeros((1, 4), np.float32)) is None and not check.aligned


def _search(fake_time_models, timed: list[set[str]]) -> tuple[onnx.ModelProto, dict]:
    def fake(models, threads, shapes):
        timed.append(set(models))
        return {label: 2.0 if label == placement.FP32 else 1.0 for label in models}

    fake_time_models(fake)
    from onnxopt.pipeline.context import PassContext

    x = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    step = QuantizePass(placement="auto", calib_samples=32)
    step.bind(PassContext(calib=open_data({"x": x})))
    return step.apply(to_proto(as_ir_model(outlier_net(batch=1)))), step.details["placement"]


def test_early_checks_keep_the_search_verdict(fake_time_models, monkeypatch):
    timed: list[set[str]] = []
    model, search = _search(fake_time_models, timed)
    failed = [c for c in search["candidates"] if c["rejected"]]
    assert search["chosen"] == "conv_gemm_matmul_fp32_sensitive_1"
    assert failed and all(c.get("checked_samples", 32) < 32 for c in failed if "SQNR" in c["rejected"])
    assert any("whatever the other" in c["rejected"] for c in failed)
    assert search["agreement_checked"].startswith("for the region candidates before their timing")
    regions = {c["label"] for c in search["candidates"] if "_fp32_" in c["label"] and "sensitive" not in c["label"]}
    assert regions and not any(regions & labels for labels in timed)  # checked first, failed, never timed
    assert search["mixed_fallback"]["fp32_layers"] == ["conv2"]

    # The same search with every check run on all samples and the regions timed first, as before.
    monkeypatch.setattr(PrefixCheck, "add", lambda self, output: None)
    before_timed: list[set[str]] = []
    before, before_search = _search(fake_time_models, before_timed)
    assert before_search["chosen"] == search["chosen"]
    assert before_search["mixed_fallback"]["fp32_layers"] == search["mixed_fallback"]["fp32_layers"]
    assert before.SerializeToString() == model.SerializeToString()
    assert all("checked_samples" not in c for c in before_search["candidates"])
