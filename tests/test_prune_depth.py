"""Depth pruning (``prune`` with ``depth``): which blocks are removable, exactness on dead blocks, importance order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_builders import GraphBuilder, compare_models, labelled_npz, random_feeds
from onnxopt.cli import main
from onnxopt.passes.prune.blocks import find_blocks, remove_blocks, value_shapes
from onnxopt.passes.prune.depgraph import lift_constants
from onnxopt.passes.prune.pass_ import PrunePass


def res_net(dead: tuple[bool, ...] = (False,), dw: bool = False, seed: int = 0) -> onnx.ModelProto:
    """input [N,3,8,8] -> stem conv relu -> residual blocks relu(x + conv(relu(conv(x)))) [-> depthwise conv relu]
    -> GAP -> Gemm. A block marked dead has a zero second conv (weights and bias): its branch adds exactly 0."""
    b = GraphBuilder(seed=seed)
    x = b.node("Relu", [b.conv(b.input("input", ["N", 3, 8, 8]), 3, 8)])
    for i, is_dead in enumerate(dead):
        y = b.node("Relu", [b.conv(x, 8, 12)])
        w = np.zeros((8, 12, 3, 3), np.float32) if is_dead else b.rng.normal(0, 0.2, (8, 12, 3, 3)).astype(np.float32)
        bias = np.zeros(8, np.float32) if is_dead else b.rng.normal(0, 0.2, 8).astype(np.float32)
        y = b.node("Conv", [y, b.weight(f"res{i}_w", w), b.weight(f"res{i}_b", bias)], kernel_shape=[3, 3],
                   pads=[1, 1, 1, 1])
        x = b.node("Relu", [b.node("Add", [x, y])])
    if dw:
        x = b.node("Relu", [b.conv(x, 8, 8, groups=8)])
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    b.node("Gemm", [pooled, b.weight("fc_w", (5, 8)), b.weight("fc_b", (5,))], ["logits"], transB=1)
    b.output("logits", ["N", 5])
    return b.build()


def blocks_of(model: onnx.ModelProto):  # noqa: ANN201 - list of Block
    proto = lift_constants(model)
    return proto, find_blocks(proto, value_shapes(proto, {"input": (1, 3, 8, 8)}))


def test_residual_branches_and_same_shape_layers_are_blocks() -> None:
    proto, blocks = blocks_of(res_net((False, False), dw=True))
    ops = [sorted(proto.graph.node[j].op_type for j in b.nodes) for b in blocks]
    residual = [o for o in ops if "Add" in o]
    assert len(residual) == 2 and all(o.count("Conv") == 2 for o in residual)
    assert any(o == ["Conv", "Relu"] for o in ops)  # the depthwise layer: same shape in and out
    # the stem (3 -> 8 channels) and the head (a graph output) are never blocks
    assert not any(proto.graph.node[j].op_type == "Gemm" for b in blocks for j in b.nodes)


def test_removing_a_dead_residual_block_is_exact() -> None:
    model = res_net((True,))
    step = PrunePass(ratio=0.0, depth=1.0)
    pruned = step.apply(model)
    onnx.checker.check_model(pruned, full_check=True)
    assert len(pruned.graph.node) < len(model.graph.node) - 3
    assert compare_models(model, pruned, random_feeds(model, batch=4, seed=2)) < 1e-5
    assert step.details["blocks_removed"] and "removed 1 of 1" in " ".join(step.notes)


def test_least_important_block_goes_first() -> None:
    model = res_net((False, True, False), seed=1)
    step = PrunePass(ratio=0.0, depth=0.34)  # one of three
    pruned = step.apply(model)
    removed = step.details["blocks_removed"]
    assert len(removed) == 1 and removed[0]["score"] < 1e-10  # the dead block changes nothing
    assert compare_models(model, pruned, random_feeds(model, batch=4, seed=3)) < 1e-5


def test_regions_read_from_outside_and_graph_outputs_are_not_blocks() -> None:
    b = GraphBuilder(seed=0)
    x = b.node("Relu", [b.conv(b.input("input", ["N", 4, 8, 8]), 4, 4)])
    inner = b.node("Relu", [b.conv(x, 4, 4)])
    y = b.node("Add", [x, b.conv(inner, 4, 4)])
    b.node("Add", [y, inner], ["out"])  # reads the branch's inner value: the branch is not single-exit
    b.output("out", ["N", 4, 8, 8])
    proto = lift_constants(b.build())
    blocks = find_blocks(proto, value_shapes(proto, {"input": (1, 4, 8, 8)}))
    for block in blocks:
        assert block.exit != "out"
        assert not any(proto.graph.node[j].op_type == "Add" for j in block.nodes)
    # what remains removable (single conv layers) gives valid models
    for block in blocks:
        onnx.checker.check_model(remove_blocks(proto, [block]), full_check=True)


def test_macs_target_met_by_depth_and_channels_after_depth() -> None:
    model = res_net((False, False, False, False), dw=True)
    step = PrunePass(macs_ratio=0.3, depth=0.5, round_to=1)
    pruned = step.apply(model)
    onnx.checker.check_model(pruned, full_check=True)
    d = step.details
    assert d["macs_after"] <= 0.7 * d["macs_before"]
    assert len(d["blocks_removed"]) >= 2
    with pytest.raises(ValueError, match="depth"):
        PrunePass(depth=1.5)


def test_cli_prune_depth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = res_net((False, False, False), dw=True)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    calib = labelled_npz(tmp_path / "calib.npz", model, samples=16)
    out = tmp_path / "p.onnx"
    code = main(["prune", str(src), "-o", str(out), "--ratio", "0.25", "--depth", "0.5", "--keep-batchnorm",
                 "--calib", str(calib), "--no-latency", "-q"])
    assert code == 0, capsys.readouterr().err
    pruned = onnx.load(out)
    assert len(pruned.graph.node) < len(model.graph.node)
    assert sum(numpy_helper.to_array(i).size for i in pruned.graph.initializer) < sum(
        numpy_helper.to_array(i).size for i in model.graph.initializer)
