"""The profile-guided FP32/int8 split of the placement search (onnxopt.passes.quantize.node_profile)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import examples
from onnxopt.calib_data import open_data
from onnxopt.modelio import load_model, to_proto
from onnxopt.passes import NormalizePass
from onnxopt.passes.quantize import QuantizePass, node_profile, placement
from onnxopt.pipeline.context import PassContext


def test_keep_fp32_keeps_a_losing_prefix_and_leaves_small_islands_int8():
    order = ["c0", "c1", "c2", "c3", "c4", "c5"]
    # c0-c1 lose in int8, c3 loses a little (less than the two switches an island would cost)
    gains = {"c0": -5.0, "c1": -3.0, "c2": 3.0, "c3": -1.0, "c4": 4.0, "c5": 4.0}
    assert node_profile.keep_fp32(order, gains, switch=1.0) == ["c0", "c1"]
    # an island whose loss exceeds two switches goes FP32
    gains["c3"] = -3.0
    assert node_profile.keep_fp32(order, gains, switch=1.0) == ["c0", "c1", "c3"]
    # a prefix that loses less than one switch stays int8: one precision throughout
    assert node_profile.keep_fp32(order, {**gains, "c0": -0.5, "c1": -0.4, "c3": 1.0}, switch=1.0) == []
    assert node_profile.keep_fp32(order, {name: 1.0 for name in order}, switch=0.0) == []
    assert node_profile.keep_fp32([], {}, switch=1.0) == []


def test_keep_fp32_matches_brute_force():
    """The dynamic program finds the best assignment (checked against every one of 2^8)."""
    rng = np.random.default_rng(0)
    order = [f"n{i}" for i in range(8)]
    for _ in range(30):
        gains = dict(zip(order, rng.normal(0.0, 1.0, len(order)).tolist()))
        switch = float(rng.uniform(0.0, 1.5))

        def score(states: list[int]) -> float:
            switches = sum(1 for a, b in zip(states, states[1:]) if a != b)
            return sum(gains[n] for n, s in zip(order, states) if s == 0) - switch * switches

        best = max(score([(mask >> i) & 1 for i in range(len(order))]) for mask in range(2 ** len(order)))
        keep = set(node_profile.keep_fp32(order, gains, switch))
        assert score([1 if n in keep else 0 for n in order]) == pytest.approx(best)


def test_split_gains_sums_the_settings_relative_to_fp32_totals():
    order = ["a", "b"]
    fp32 = [{"a": 10.0, "b": 10.0}, {"a": 50.0, "b": 50.0}]  # totals 20 and 100
    int8 = [{"a": 5.0, "b": 12.0}, {"a": 60.0}]  # b missing from the second int8 profile: gains 0 there
    gains, switch = node_profile.split_gains(order, fp32, int8)
    assert gains["a"] == pytest.approx(5.0 / 20 - 10.0 / 100)
    assert gains["b"] == pytest.approx(-2.0 / 20)
    assert switch == pytest.approx(node_profile.SWITCH_FRACTION * (10.0 / 20 + 50.0 / 100))


def _residual_net() -> onnx.ModelProto:
    """conv -> relu -> conv -> add(residual) -> relu -> pool -> flatten -> gemm, named nodes, batch dim dynamic."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "r0"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [init("w0", 16, 3, 3, 3), init("b0", 16), init("w1", 16, 16, 3, 3), init("b1", 16), init("wf", 10, 16),
         init("bf", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_attribute_events_maps_renamed_kernels_back_to_their_heavy_node():
    model = _residual_net()
    events = {
        "r0_nchwc": 3.0,  # NCHWc conv named after the Relu output it fused
        "s_nchwc": 4.0,  # conv1 fused with the Add: the input read only by the Add is conv1's
        "conv0_token_5": 1.0,  # layout transformer suffix
        "conv1_quant_token_2": 2.0,  # QOperator writer + layout transformer
        "fc": 0.5,
        "QuantizeLinear_12": 9.0, "ReorderOutput_token_3": 9.0, "pool": 9.0,  # not heavy: left out
    }
    assert node_profile.attribute_events(model, events) == {"conv0": 4.0, "conv1": 6.0, "fc": 0.5}


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_real_profiles_map_every_heavy_node(fmt, tmp_path):
    """ORT's own kernel names, FP32 and int8, all map back (the search needs half of them per setting)."""
    model = _residual_net()
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    step = QuantizePass(placement="all", format=fmt).bind(PassContext(calib=open_data(str(tmp_path / "calib.npz"))))
    int8 = step.apply(model)
    heavy = {"conv0", "conv1", "fc"}
    for batch in (1, 4):
        shapes = {"x": (batch, 3, 16, 16)}
        for graph in (model, int8):
            mapped = node_profile.attribute_events(model, node_profile.profile_kernels(graph, shapes, 1, runs=4))
            assert set(mapped) == heavy and all(us > 0 for us in mapped.values())


def _conv_names(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type in placement.HEAVY_OPS]


def _search_with(fake_time_models, timing, slow_first_conv: bool = True, sees_race: bool = False,
                 deployed=None, **params) -> tuple[dict, onnx.ModelProto, list[str]]:
    """The default search on the normalized example with ``timing(label, batch8, threads)`` -> ms (FP32 2.0; with
    ``sees_race``, ``timing(label, batch8, threads, raced)`` also gets the labels timed in the same race) and a
    profile in which int8 is 2x faster on every conv but, with ``slow_first_conv``, the first (so the split keeps
    it FP32); ``deployed``, a fake of ``placement.time_deployed`` (default: the same timings); the placement details,
    the output model and the conv names."""
    model = load_model(examples.default_model_path())
    NormalizePass().apply(model)
    proto = to_proto(model)
    convs = _conv_names(proto)

    def fake(models, threads, shapes):
        big = any(shape[0] == placement.CONFIRM_BATCH for shape in shapes.values())
        raced = sorted(models)
        return {label: 2.0 if label == placement.FP32 else (
            timing(label, big, threads, raced) if sees_race else timing(label, big, threads))
            for label in models}

    def profile(graph, shapes, threads):
        int8 = any(node.op_type in ("QuantizeLinear", "QLinearConv") for node in graph.graph.node)
        return {name: (40.0 if int8 and slow_first_conv and name == convs[0] else 5.0 if int8 else 10.0)
                for name in convs}

    fake_time_models(fake, profile, deployed)
    step = QuantizePass(placement="auto", calib_samples=32, **params).bind(
        PassContext(calib=open_data(str(examples.default_calib_path()))))
    out = step.apply(proto)
    return step.details["placement"], out, convs


def _whole_slower_at_batch_8(label: str, big: bool, threads) -> float:
    return 1.5 if label.endswith("_fp32_profiled") else (3.0 if big else 1.0)


def test_search_tries_the_profiled_split_when_the_whole_model_loses_at_batch_8(fake_time_models):
    """int8 2x faster at batch 1 but slower at batch 8 (MnasNet's case): the profile shows the first conv losing in
    int8, the candidate keeping it FP32 is timed, confirmed at every setting and kept."""
    info, out, convs = _search_with(fake_time_models, _whole_slower_at_batch_8)
    assert info["chosen"] == "all_fp32_profiled"
    assert info["profiled"]["source"] == "all" and info["profiled"]["fp32_nodes"] == [convs[0]]
    # the faster qoperator model is confirmed first and fails at batch 8 too; the profiled split gets its own try
    assert [c["label"] for c in info["confirmations"]] == ["all", "qoperator", "all_fp32_profiled"]
    assert "slower than FP32 at batch 8" in next(c for c in info["candidates"] if c["label"] == "all")["rejected"]
    # the first conv reads its float weight, the others read int8 weights through DequantizeLinear
    producers = {out_name: node.op_type for node in out.graph.node for out_name in node.output}
    weights = {node.name: node.input[1] for node in out.graph.node if node.name in convs}
    assert weights[convs[0]] in {init.name for init in out.graph.initializer}
    assert all(producers.get(weights[name]) == "DequantizeLinear" for name in convs[1:])


def test_no_profiled_candidate_when_the_profile_finds_nothing_slower(fake_time_models):
    info, _, _ = _search_with(fake_time_models, _whole_slower_at_batch_8, slow_first_conv=False)
    assert info["chosen"] == "fp32" and info["profiled"]["fp32_nodes"] == []
    assert not any(c["label"].endswith("_fp32_profiled") for c in info["candidates"])


def test_the_split_is_kept_when_its_slowest_setting_beats_the_whole_models(fake_time_models):
    """The whole model wins the batch-1 race and passes at batch 8 by a hair (1.05x); the split, slower at batch 1
    (1.33x), is 2x at batch 8: on its slowest setting it is the faster one, and it is kept."""
    info, _, _ = _search_with(fake_time_models, lambda label, big, threads: (
        1.0 if big else 1.5) if label.endswith("_fp32_profiled") else (1.9 if big else 1.0))
    assert info["chosen"] == "all_fp32_profiled"
    assert info["worst_setting"]["winner"] == "all" and info["worst_setting"]["kept"] == "all_fp32_profiled"
    worst = info["worst_setting"]["worst"]
    assert worst == {"all": pytest.approx(2.0 / 1.9), "all_fp32_profiled": pytest.approx(4 / 3)}


def test_the_whole_model_is_kept_when_the_split_is_not_clearly_faster_everywhere(fake_time_models):
    info, _, _ = _search_with(fake_time_models, lambda label, big, threads: (
        1.5 if label.endswith("_fp32_profiled") else 1.52))
    assert info["chosen"] == "all" and info["worst_setting"]["kept"] == "all"
    # and the split winning the race meets the fastest whole model the same way
    info, _, _ = _search_with(fake_time_models, lambda label, big, threads: 0.9 if label.endswith(
        "_fp32_profiled") else (1.0 if not big else 1.1))
    assert info["chosen"] == "all_fp32_profiled" and info["worst_setting"]["winner"] == "all_fp32_profiled"
    assert info["worst_setting"]["other"] in ("all", "qoperator")


def _split_wins_at_batch_8(label: str, big: bool, threads) -> float:
    """The whole model wins the batch-1 race, the split is the faster one on its slowest setting (batch 8)."""
    return (1.0 if big else 1.5) if label.endswith("_fp32_profiled") else (1.9 if big else 1.0)


@pytest.mark.parametrize("split_as_deployed, kept", [(1.6, "all_fp32_profiled"), (2.5, "all")])
def test_the_other_candidate_is_timed_as_deployed_only_once_it_would_be_kept(fake_time_models, monkeypatch,
                                                                             split_as_deployed, kept):
    """The winner passes the check as deployed in its confirmation; the other of {split, whole model} meets it only
    when the races of every setting keep it, and a failure there leaves the winner, with the reason said."""
    monkeypatch.setattr(placement, "deployed_check", lambda threads: True)
    timed: list[str] = []

    def deployed(models, threads, shapes):
        timed.extend(label for label in models if label != placement.FP32)
        return {label: 2.0 if label == placement.FP32 else split_as_deployed if label.endswith("_fp32_profiled")
                else 1.6 for label in models}  # 1.25x: below ELSEWHERE_AT_ONCE, DEPLOYED_RACES each

    info, _, _ = _search_with(fake_time_models, _split_wins_at_batch_8, deployed=deployed)
    record = info["worst_setting"]
    assert record["winner"] == "all" and record["other"] == "all_fp32_profiled"
    assert info["chosen"] == kept and record["kept"] == kept
    races = placement.DEPLOYED_RACES
    assert timed[:races] == ["all"] * races and set(timed[races:]) == {"all_fp32_profiled"}
    split = next(c for c in info["confirmations"] if c["label"] == "all_fp32_profiled")
    assert split["elsewhere"][placement.DEPLOYED] == pytest.approx(2.0 / split_as_deployed)
    if kept == "all":
        assert f"all_fp32_profiled slower than FP32 at {placement.DEPLOYED}" in record["why"]
        assert record["why"].endswith("kept all")


def test_a_losing_other_candidate_is_not_timed_as_deployed(fake_time_models, monkeypatch):
    monkeypatch.setattr(placement, "deployed_check", lambda threads: True)
    timed: list[str] = []

    def deployed(models, threads, shapes):
        timed.extend(label for label in models if label != placement.FP32)
        return {label: 2.0 if label == placement.FP32 else 1.6 for label in models}

    info, _, _ = _search_with(fake_time_models, lambda label, big, threads: 0.9 if label.endswith(
        "_fp32_profiled") else (1.0 if not big else 1.1), deployed=deployed)
    record = info["worst_setting"]
    assert info["chosen"] == record["winner"] == "all_fp32_profiled" and record["other"] in ("all", "qoperator")
    assert timed == ["all_fp32_profiled"] * placement.DEPLOYED_RACES


def test_split_and_whole_model_are_compared_in_races_of_their_own(fake_time_models):
    """The split 1.3x FP32 and the whole model 1.15x at its slowest setting whenever both run in one race, but the
    split's own races land in a spell of load (1.05x): compared on their confirmations the whole model would be kept;
    timed together (one race per setting), the split is."""
    def timing(label, big, threads, raced):
        split = label.endswith("_fp32_profiled")
        together = any(r.endswith("_fp32_profiled") for r in raced) and any(r in ("all", "qoperator") for r in raced)
        if split and not together and len(raced) == 2:
            return 1.9  # its own races (confirmation, other settings), in a spell of load: 1.05x
        return 2.0 / 1.3 if split else 2.0 / (1.15 if big else 2.0)

    info, _, _ = _search_with(fake_time_models, timing, sees_race=True)
    record = info["worst_setting"]
    split_label = next(label for label in record["worst"] if label.endswith("_fp32_profiled"))
    whole_label = next(label for label in record["worst"] if label != split_label)
    assert record["confirmed_worst"][split_label] < record["confirmed_worst"][whole_label]
    assert record["worst"][split_label] == pytest.approx(1.3) and record["worst"][whole_label] == pytest.approx(1.15)
    assert info["chosen"] == split_label and "timed together" in record["why"]


def _finalists_at_batch_8(split_together: float, whole_together: placement.Timing):
    """The whole models win the batch-1 race (2x FP32), the split 1.33x; both pass their own races at batch 8
    (1.25x), and the race of both finalists times them at batch 8 as given (FP32 2.0 ms)."""
    def timing(label, big, threads, raced):
        split = label.endswith("_fp32_profiled")
        together = any(r.endswith("_fp32_profiled") for r in raced) and any(r in ("all", "qoperator") for r in raced)
        if big:
            return (split_together if split else whole_together) if together else 1.6
        return 1.5 if split else 1.0

    return timing


def test_finalists_the_race_of_both_finds_slower_than_fp32_are_not_kept(fake_time_models):
    """Both finalists passed their own races at batch 8; the race of both reads them slower than FP32 there (0.91x
    and 0.87x by median and fastest run): neither is kept, the model stays FP32 and the verdict says why."""
    info, out, _ = _search_with(fake_time_models, _finalists_at_batch_8(2.2, placement.Timing(2.3, 2.3)),
                                sees_race=True)
    record = info["worst_setting"]
    assert info["chosen"] == placement.FP32 and record["kept"] == placement.FP32
    assert set(record["slower"]) == {record["winner"], record["other"]}
    assert all(text.startswith("batch 8: ") for text in record["slower"].values())
    assert record["why"].endswith("kept FP32") and "in the race of both" in record["why"]
    assert info["verdict"].startswith("no int8 finalist stayed not slower than FP32 at every setting")
    assert not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in out.graph.node)


def test_the_other_finalist_is_kept_when_the_preferred_one_reads_slower_together(fake_time_models):
    """The race of both reads the split, the one its slowest setting prefers, slower than FP32 at batch 8 (0.94x by
    both ratios) and the whole model inconclusive there (1.05x by median, 0.91x by fastest run): the whole model,
    which passed its own races, is kept."""
    info, _, _ = _search_with(fake_time_models, _finalists_at_batch_8(2.12, placement.Timing(1.9, 2.2)),
                              sees_race=True)
    record = info["worst_setting"]
    split = next(label for label in record["worst"] if label.endswith("_fp32_profiled"))
    assert record["worst"][split] > record["worst"][record["winner"]]  # the split is the preferred one
    assert list(record["slower"]) == [split] and info["chosen"] == record["kept"] == record["winner"] != split
    assert f"then {split} slower than FP32 at batch 8: 0.94x" in record["why"]


def test_profile_split_false_builds_no_split(fake_time_models):
    info, _, _ = _search_with(fake_time_models, _whole_slower_at_batch_8, profile_split=False)
    assert info["chosen"] == "fp32" and "profiled" not in info
    assert not any(c["label"].endswith("_fp32_profiled") for c in info["candidates"])
