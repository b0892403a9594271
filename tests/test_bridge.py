"""The torch bridge (onnxopt.bridge): parity with ONNX Runtime, gradients, write-back, BatchNorm training, fake-quant.

Parity target: relative error <= 1e-4 in float32 (max |bridge - reference| / max |reference| per output).
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxopt.bridge import UnsupportedOpError, corpus, to_torch, write_back  # noqa: E402
from onnxopt.errors import BadInputError  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _bridge(module, *inputs):
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.array(x, copy=True)) for x in inputs])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


# ------------------------------------------------------------------------------------------- backend test corpus


@pytest.fixture(scope="module")
def node_cases_by_op() -> dict[str, list[corpus.Case]]:
    by_op: dict[str, list[corpus.Case]] = defaultdict(list)
    for case in corpus.node_cases():
        if corpus.excluded_reason(case.name) is None:
            for op_type in case.ops:
                by_op[op_type].append(case)
    return by_op


def test_node_backend_cases_match_onnxruntime(node_cases_by_op):
    """Every generated onnx backend node case of the issue's op set (minus the listed out-of-scope variants) runs
    through the bridge and matches ONNX Runtime (or the case's own outputs where ORT cannot run it)."""
    cases = {c.name: c for cases in node_cases_by_op.values() for c in cases}
    assert len(cases) > 400
    failures = []
    for case in cases.values():
        result = corpus.parity(case)
        if result.worst > TOL:
            failures.append((result.name, result.vs_ort, result.vs_expected, result.error))
    assert not failures, failures
    missing = [op for op in corpus.ISSUE_OPS if op not in node_cases_by_op and op != "Constant"]
    assert not missing, f"no backend node case exercised {missing}"


def test_backend_model_folders_match():
    """pytorch-converted, pytorch-operator and simple: every model whose ops the bridge covers matches the test
    data's outputs (and ONNX Runtime where it loads these opset-6..9 files)."""
    from onnxopt.bridge import supported_ops

    supported = set(supported_ops())
    checked, failures = 0, []
    for case in corpus.model_dir_cases():
        if not case.ops <= supported:
            with pytest.raises(UnsupportedOpError):
                to_torch(case.model)
            continue
        result = corpus.parity(case)
        checked += 1
        if result.worst > TOL or (result.vs_expected is not None and result.vs_expected > TOL):
            failures.append(result)
    assert checked >= 110
    assert not failures, failures


def test_light_models_match_onnxruntime():
    """Two of the Caffe2-era 224x224 light models (the benchmark runs all nine)."""
    for case in corpus.light_cases(["light_squeezenet", "light_inception_v1"]):
        result = corpus.parity(case)
        assert result.vs_ort is not None and result.vs_ort <= TOL, result


# ---------------------------------------------------------------------------------------------- torch exports


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet", "shufflenetv2", "transformer"])
def test_torch_exports_parity_gradients_write_back(torch_models, name):
    path = torch_models[name]
    model = onnx.load(str(path))
    module = to_torch(model)
    for batch in (1, 3):  # dynamic batch dim
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        reference = corpus.ort_outputs(model, [x])
        assert corpus.error(reference, _bridge(module, x)) <= TOL
    # every trainable weight gets a gradient
    params = module.onnx_parameters()
    tied = {n.output[0] for n in model.graph.node if n.op_type == "Identity"}  # LayerNorm ones/zeros, tied
    assert params and set(params) <= {i.name for i in model.graph.initializer} | tied
    module.train()
    out = module(torch.randn(4, 3, 32, 32))
    (out ** 2).mean().backward()
    no_grad = [n for n, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not no_grad
    # unchanged weights -> the same bytes (the module ran in train mode above: BN stats moved, so rebuild)
    assert write_back(to_torch(model), model).SerializeToString() == model.SerializeToString()


def test_paddle_cls_model(paddle_cls_path):
    """Weights in 308 Constant nodes, opset 11, dynamic H/W: parity at two widths, gradients, exact write-back."""
    model = onnx.load(str(paddle_cls_path))
    module = to_torch(model)
    rng = np.random.default_rng(0)
    for shape in ((2, 3, 48, 192), (1, 3, 48, 160)):
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        assert corpus.error(corpus.ort_outputs(model, [x]), _bridge(module, x)) <= TOL
    params = module.onnx_parameters()
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    assert len(params) > 50 and set(params) <= constants
    module.train()
    module(torch.randn(2, 3, 48, 192))[:, 0].sum().backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in params.values())
    assert write_back(to_torch(model), model).SerializeToString() == model.SerializeToString()
    # changed weights and running statistics go back into the Constant nodes
    module.eval()
    with torch.no_grad():
        for p in params.values():
            p.mul_(0.9)
    changed = write_back(module, model)
    assert [n.op_type for n in changed.graph.node] == [n.op_type for n in model.graph.node]
    x = rng.uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    assert corpus.error(corpus.ort_outputs(changed, [x]), _bridge(module, x)) <= TOL


def test_paddle_det_model_resize_and_conv_transpose():
    """PP-OCRv4 det (Resize nearest, ConvTranspose, HardSigmoid) on two rendered text lines stacked: [1,3,96,192]."""
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    path = Path(rapidocr.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not path.is_file():
        pytest.skip("rapidocr_onnxruntime does not ship the v4 det model")
    from onnxopt.datasets import render_textlines

    lines, _ = render_textlines(2, seed=0)
    x = np.ascontiguousarray(np.concatenate(list(lines), axis=1)[None], dtype=np.float32)
    model = onnx.load(str(path))
    assert corpus.error(corpus.ort_outputs(model, [x]), _bridge(to_torch(model), x)) <= TOL


def test_write_back_of_changed_weights_matches_bridge(torch_models):
    model = onnx.load(str(torch_models["resnet"]))
    module = to_torch(model)
    with torch.no_grad():
        for p in module.onnx_parameters().values():
            p.mul_(1.1).add_(0.01)
    out = write_back(module, model)
    onnx.checker.check_model(out, full_check=True)
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert corpus.error(corpus.ort_outputs(out, [x]), _bridge(module, x)) <= TOL
    assert corpus.error(corpus.ort_outputs(model, [x]), _bridge(module, x)) > 1e-3


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet", "shufflenetv2", "vgg"])
def test_gradients_and_statistics_equal_the_hand_written_net(name):
    """One training step through the bridge gives the gradients and BN statistics torch's own autograd gives on the
    zoo net the graph was exported from (initializer names are the net's parameter names)."""
    from onnxopt.zoo import nets

    net = nets.build(name, seed=0)
    module = to_torch(onnx.load_from_string(nets.export_onnx(net))).train()
    net.train()
    for layer in net.modules():
        if isinstance(layer, torch.nn.Dropout):  # the eval-mode export has none
            layer.eval()
    x = torch.randn(6, 3, 32, 32)
    net(x).logsumexp(1).mean().backward()
    module(x).logsumexp(1).mean().backward()
    reference = dict(net.named_parameters())
    params = module.onnx_parameters()
    assert set(params) == set(reference)
    for key, param in params.items():
        torch.testing.assert_close(param.grad, reference[key].grad, rtol=1e-4, atol=1e-6)
    state = net.state_dict()
    for key, stat in module.onnx_buffers().items():
        torch.testing.assert_close(stat, state[key], rtol=1e-5, atol=1e-6)


def test_tied_initializers_train_apart_and_write_back():
    """A freshly initialized zoo net: the TorchScript exporter ties equal tensors (BN weight = running var = ones)
    through Identity nodes. Each tied copy is its own parameter/statistic; write-back unties what diverged."""
    from onnxopt.zoo import nets

    model = onnx.load_from_string(nets.export_onnx(nets.build("resnet", seed=0)))
    assert any(n.op_type == "Identity" for n in model.graph.node)
    module = to_torch(model).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.randn(8, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()
    module.eval()
    out = write_back(module, model)
    onnx.checker.check_model(out, full_check=True)
    assert len(out.graph.node) == len(model.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert corpus.error(corpus.ort_outputs(out, [x]), _bridge(module, x)) <= TOL


# --------------------------------------------------------------------------------------------------- BatchNorm


def _bn_model(momentum: float = 0.9, eps: float = 1e-5) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (rng.uniform(0.5, 1.5, c), "scale"), (rng.normal(0, 0.1, c), "bias"), (rng.normal(0, 0.1, c), "mean"),
        (rng.uniform(0.5, 1.5, c), "var"))]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn",
                            momentum=momentum, epsilon=eps)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_batchnorm_train_mode_matches_torch_and_is_written_back():
    model = _bn_model(momentum=0.8, eps=1e-3)
    module = to_torch(model).train()
    reference = torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.2)  # torch momentum = 1 - ONNX momentum
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    with torch.no_grad():
        reference.weight.copy_(init["scale"])
        reference.bias.copy_(init["bias"])
        reference.running_mean.copy_(init["mean"])
        reference.running_var.copy_(init["var"])
    reference.train()
    for step in range(3):
        x = torch.randn(6, 4, 5, 5) * (step + 1) + step
        torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)
    stats = module.onnx_buffers()
    torch.testing.assert_close(stats["mean"], reference.running_mean)
    torch.testing.assert_close(stats["var"], reference.running_var)
    module.eval()
    reference.eval()
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)
    written = {t.name: numpy_helper.to_array(t) for t in write_back(module, model).graph.initializer}
    np.testing.assert_array_equal(written["mean"], stats["mean"].numpy())
    np.testing.assert_array_equal(written["var"], stats["var"].numpy())
    assert not np.allclose(written["var"], numpy_helper.to_array(model.graph.initializer[3]))
    assert set(module.onnx_parameters()) == {"scale", "bias"}


# ------------------------------------------------------------------------------------------------ quantization


def _qdq_model(per_channel: bool, zp_dtype=np.uint8, weight_zero_point: bool = True) -> onnx.ModelProto:
    """x -> Q/DQ (activation, per tensor) -> Conv(W = DQ(int8 weight, per channel or per tensor)) -> y."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32) if per_channel else \
        np.array(np.abs(w).max() / 127, np.float32)
    w_q = np.clip(np.rint(w / (w_scale.reshape(-1, 1, 1, 1) if per_channel else w_scale)), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128 if zp_dtype == np.uint8 else 0, zp_dtype), "x_zp"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        *([numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "w_zp")] if weight_zero_point else []),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"] if weight_zero_point else ["w_q", "w_scale"],
                         ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["xdq", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("per_channel,zp_dtype", [(True, np.uint8), (False, np.int8)])
def test_qdq_parity_and_straight_through_gradient(per_channel, zp_dtype):
    model = _qdq_model(per_channel, zp_dtype)
    x = np.random.default_rng(1).uniform(-3, 3, (2, 3, 6, 6)).astype(np.float32)  # partly outside the int range
    module = to_torch(model)
    assert corpus.error(corpus.ort_outputs(model, [x]), _bridge(module, x)) <= TOL
    # STE: d(fake_quant(x))/dx is 1 inside the representable range and 0 where the clamp saturates
    xt = torch.from_numpy(x).requires_grad_(True)
    _, feats = module.run_with_features(xt, capture=["xdq"])
    feats["xdq"].sum().backward()
    lo, hi = (0 - 128) * 0.02, (255 - 128) * 0.02
    if zp_dtype == np.int8:
        lo, hi = -128 * 0.02, 127 * 0.02
    inside = (xt > lo + 0.01) & (xt < hi - 0.01)
    outside = (xt < lo - 0.01) | (xt > hi + 0.01)
    assert inside.any() and outside.any()
    assert torch.all(xt.grad[inside] == 1) and torch.all(xt.grad[outside] == 0)


def test_stochastic_rounding_is_unbiased_in_train_mode_only():
    module = to_torch(_qdq_model(False, np.int8))
    module.stochastic_rounding = True
    x = torch.full((256, 3, 6, 6), 0.013)  # 0.65 of a 0.02 step: nearest rounding gives 0.02 everywhere
    module.eval()
    _, feats = module.run_with_features(x, capture=["xdq"])
    assert torch.allclose(feats["xdq"], torch.full_like(x, 0.02))
    module.train()
    _, feats = module.run_with_features(x, capture=["xdq"])
    codes = feats["xdq"] / 0.02
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # still on the integer grid
    assert set(codes.round().unique().tolist()) == {0.0, 1.0}
    assert abs(feats["xdq"].mean().item() - 0.013) < 5e-4  # unbiased


def test_trainable_scales_get_lsq_gradients():
    model = _qdq_model(True)
    module = to_torch(model, train_quant_scales=True)
    params = module.onnx_parameters()
    assert {"x_scale", "w_scale", "b"} <= set(params)
    module(torch.randn(2, 3, 6, 6) * 2).square().mean().backward()
    assert params["x_scale"].grad is not None and params["x_scale"].grad.abs().item() > 0
    assert write_back(to_torch(model, train_quant_scales=True), model).SerializeToString() == \
        model.SerializeToString()


@pytest.mark.parametrize("weight_zero_point", [True, False])
def test_train_quantized_weights_fake_quant_and_requantize(weight_zero_point):
    """Also without a zero point input (the quantize pass's compact form): the range is the int8 weight's."""
    model = _qdq_model(True, weight_zero_point=weight_zero_point)
    module = to_torch(model, train_quantized_weights=True)
    params = module.onnx_parameters()
    assert "w_q" in params and params["w_q"].dtype == torch.float32
    x = np.random.default_rng(2).uniform(-2, 2, (2, 3, 6, 6)).astype(np.float32)
    assert corpus.error(corpus.ort_outputs(model, [x]), _bridge(module, x)) <= TOL
    assert write_back(module, model).SerializeToString() == model.SerializeToString()
    module(torch.from_numpy(x)).sum().backward()
    assert params["w_q"].grad is not None and torch.any(params["w_q"].grad != 0)
    with torch.no_grad():  # move every weight by ~0.6 quantization steps: some codes change
        scale = torch.from_numpy(numpy_helper.to_array(
            next(t for t in model.graph.initializer if t.name == "w_scale")).copy()).reshape(-1, 1, 1, 1)
        params["w_q"].add_(0.6 * scale * torch.sign(torch.randn_like(params["w_q"])))
    out = write_back(module, model)
    codes = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert codes["w_q"].dtype == np.int8
    assert not np.array_equal(codes["w_q"], numpy_helper.to_array(model.graph.initializer[2]))
    assert codes["w_q"].min() < 0  # negative codes survive (an int8 range, not uint8)
    assert corpus.error(corpus.ort_outputs(out, [x]), _bridge(module, x)) <= TOL


# ------------------------------------------------------------------------------------------ API and bad input


def test_unsupported_ops_name_op_and_node():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Det", ["x"], ["y"], name="the_det")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOpError, match="'Det' at node 'the_det'") as info:
        to_torch(model)
    assert isinstance(info.value, BadInputError)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    flow = helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=branch, else_branch=branch)
    model = helper.make_model(helper.make_graph([flow], "g", [cond, x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOpError, match="'If' at node 'branchy'"):
        to_torch(model)
    custom = helper.make_node("Gelu", ["x"], ["y"], name="ms_gelu", domain="com.microsoft")
    model = helper.make_model(helper.make_graph([custom], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOpError, match="ms_gelu"):
        to_torch(model)


def test_dynamic_shape_arithmetic_and_features():
    """Shape -> Gather -> Concat -> Reshape with shapes that change per call; captured features keep gradients."""
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(np.random.default_rng(0).normal(size=(5,)).astype(np.float32), "w")]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Mul", ["x", "w"], ["scaled"], name="mul"),
        helper.make_node("Reshape", ["scaled", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    module = to_torch(model)
    for shape in ((2, 3, 5), (4, 1, 5), (2, 3, 5), (4, 1, 5)):  # the shape arithmetic is cached per input shape
        x = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
        assert corpus.error(corpus.ort_outputs(model, [x]), _bridge(module, x)) <= TOL
    assert len(module._shape_cache) == 2
    assert [v[0] for v in module.value_names()] == ["shape", "n", "n1", "target", "scaled", "y"]
    assert module.value_names()[4] == ("scaled", "mul", "Mul")
    out, feats = module.run_with_features(torch.randn(3, 2, 5), capture=["scaled", "target"])
    assert out.shape == (3, 10) and feats["target"].tolist() == [3, -1]
    feats["scaled"].sum().backward()
    assert module.onnx_parameters()["w"].grad.shape == (5,)
    out2, feats2 = module(torch.randn(3, 2, 5), capture=["target"])  # the same through forward (DDP wrappers)
    assert out2.shape == (3, 10) and feats2["target"].tolist() == [3, -1]
    with pytest.raises(BadInputError, match="no_such_value"):
        module.run_with_features(torch.randn(1, 1, 5), capture=["no_such_value"])
    with pytest.raises(BadInputError, match="takes 1 inputs"):
        module(torch.randn(1, 1, 5), torch.randn(1))


def test_shape_like_float_constants_are_not_parameters():
    """Resize scales, Clip bounds and scalar constants stay constants; only weights are parameters."""
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([], np.float32), "roi"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"),
             numpy_helper.from_array(np.ones((1, 2, 1, 1), np.float32), "gain")]
    nodes = [helper.make_node("Resize", ["x", "roi", "scales"], ["r"], name="resize", mode="nearest"),
             helper.make_node("Add", ["r", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("Mul", ["c", "gain"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    module = to_torch(model)
    assert set(module.onnx_parameters()) == {"gain"}
    x = np.random.default_rng(0).normal(size=(1, 2, 3, 3)).astype(np.float32) * 4
    assert corpus.error(corpus.ort_outputs(model, [x]), _bridge(module, x)) <= TOL


def test_import_onnxopt_does_not_import_torch():
    code = "import sys, onnxopt, onnxopt.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_deep_copies_train_independently(torch_models):
    """copy.deepcopy (EMA teachers, best checkpoints): the copy has its own weights, statistics and train/eval mode."""
    import copy

    model = onnx.load(str(torch_models["mobilenetv2"]))
    module = to_torch(model)
    twin = copy.deepcopy(module).train()
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in module.onnx_buffers().items()}
    twin(x)  # train mode: the twin's running statistics move, the original's do not
    assert all(torch.equal(before[k], v) for k, v in module.onnx_buffers().items())
    assert any(not torch.equal(before[k], v) for k, v in twin.onnx_buffers().items())
    with torch.no_grad():
        next(iter(twin.onnx_parameters().values())).add_(1.0)
    x_np = x.numpy()
    assert corpus.error(corpus.ort_outputs(model, [x_np]), _bridge(module, x_np)) <= TOL
    twin.load_state_dict(module.state_dict())
    twin.eval()
    assert corpus.error(_bridge(module, x_np), _bridge(twin, x_np)) == 0
