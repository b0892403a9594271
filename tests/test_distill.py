"""Distillation: losses, layer matching, the training loop, the ``distill`` pass, CLI, QAT and DDP."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnx_builders import conv_classifier, labelled_npz, run, save

torch = pytest.importorskip("torch")
F = torch.nn.functional

from onnxopt.errors import BadInputError, DataError  # noqa: E402
from onnxopt.passes.distill import losses  # noqa: E402
from onnxopt.passes.distill.data import TrainData, make_augment  # noqa: E402
from onnxopt.passes.distill.matching import match_by_resolution, stages  # noqa: E402
from onnxopt.passes.distill.teacher import OrtTeacher, logits_value  # noqa: E402
from onnxopt.passes.distill.trainer import DistillConfig, TrainingDivergedError, parse_method, train  # noqa: E402
from onnxopt.pipeline.base import OnnxoptPass  # noqa: E402
from onnxopt.pipeline.registry import register  # noqa: E402

torch.set_num_threads(1)


def _logits(seed: int = 0, n: int = 8, c: int = 5) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 2


# ------------------------------------------------------------------------------------------------------- losses


def test_kd_known_value_and_t2_scaling():
    s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 1.0, 0.0]])
    for T in (1.0, 4.0):
        p_t = np.exp(t.numpy() / T) / np.exp(t.numpy() / T).sum()
        p_s = np.exp(s.numpy() / T) / np.exp(s.numpy() / T).sum()
        expected = float((p_t * (np.log(p_t) - np.log(p_s))).sum() * T * T)
        assert losses.kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert losses.kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "ofa"])
def test_logit_losses_minimal_at_teacher_and_give_gradients(name):
    t = _logits(1)
    target = t.argmax(1)

    def loss(s: torch.Tensor) -> torch.Tensor:
        if name == "kd":
            return losses.kd_loss(s, t, 4.0)
        if name == "dkd":
            return losses.dkd_loss(s, t, target, 4.0)
        if name == "dist":
            return losses.dist_loss(s, t, 4.0)
        return losses.ofa_loss(s, t, target, 1.0, 1.0)

    s = _logits(2).requires_grad_(True)
    value = loss(s)
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    at_teacher = loss(t.clone()).item()
    assert at_teacher < value.item()
    if name != "ofa":  # OFA is a cross-entropy: its minimum is the teacher's entropy, not 0
        assert at_teacher == pytest.approx(0.0, abs=1e-5)


def test_dist_ignores_teacher_shift_and_dkd_two_classes():
    t = _logits(3)
    assert losses.dist_loss(t + 5.0, t, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    s2, t2 = _logits(4, c=2), _logits(5, c=2)
    value = losses.dkd_loss(s2, t2, t2.argmax(1))  # no non-target distribution with 2 classes: TCKD only
    assert math.isfinite(value.item()) and value.item() > 0


def test_ofa_eps_one_is_soft_cross_entropy_plus_target():
    s, t = _logits(6), _logits(7)
    target = t.argmax(1)
    p_t = F.softmax(t, 1)
    soft = -(p_t * F.log_softmax(s, 1)).sum(1)
    bump = -F.log_softmax(s, 1).gather(1, target[:, None])[:, 0]  # (1 + p) - p = 1 extra on the target
    assert losses.ofa_loss(s, t, target, 1.0, 1.0).item() == pytest.approx((soft + bump).mean().item(), rel=1e-5)


def test_feature_losses_zero_on_equal_maps_and_cross_width():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    assert losses.hint_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.at_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.fsp_loss((a, b), (a, b)).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.fsp_matrix(a, torch.randn(4, 3, 6, 6)).shape == (4, 8, 3)
    wide = torch.randn(4, 32, 6, 6, requires_grad=True)  # attention maps compare any widths
    value = losses.at_loss(wide, a)
    value.backward()
    assert value.item() > 0 and wide.grad.abs().sum() > 0
    adapter = losses.Adapter(8, 16)
    assert adapter(a).shape == (4, 16, 6, 6)
    assert losses.LogitProjector(8, 10)(a).shape == (4, 10)


def test_parse_method():
    assert parse_method("kd") == ("kd", [])
    assert parse_method("dkd+at+fitnet") == ("dkd", ["at", "fitnet"])
    assert parse_method("none") == (None, [])
    with pytest.raises(ValueError, match="unknown distillation method"):
        parse_method("crd")
    with pytest.raises(ValueError, match="one"):
        parse_method("kd+dist")


# ------------------------------------------------------------------------------------------------------ matching


def test_match_by_resolution_pairs_stage_outputs():
    student = [("s1", (3, 8, 32, 32)), ("s2", (3, 16, 16, 16)), ("s3", (3, 16, 16, 16)), ("s4", (3, 32, 8, 8)),
               ("w", (16, 3, 3, 3)), ("gap", (3, 32, 1, 1))]
    teacher = [("t1", (3, 16, 16, 16)), ("t2", (3, 64, 8, 8)), ("t3", (3, 64, 8, 8)), ("t4", (3, 128, 4, 4))]
    pairs = match_by_resolution(student, teacher, batch=3)
    assert [(p.resolution, p.student.last, p.teacher.last) for p in pairs] == [((16, 16), "s3", "t1"),
                                                                               ((8, 8), "s4", "t3")]
    assert pairs[0].student.first == "s2" and pairs[1].teacher.first_channels == 64
    assert (3, 3) not in stages(student, batch=3)  # the weight is not a feature map
    assert match_by_resolution(student, [("x", (3, 4, 5, 7))], batch=3) == []


def test_logits_value_skips_final_softmax():
    model = conv_classifier()
    assert logits_value(model) == "logits"
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    model.graph.output[0].name = "probs"
    assert logits_value(model) == "logits"


# ------------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A teacher (16 channels), an untrained student (8 channels) of 4 classes on 8x8 inputs, and labelled data."""
    folder = tmp_path_factory.mktemp("distill")
    teacher = conv_classifier(channels=16, seed=0)
    student = conv_classifier(channels=8, seed=5)
    paths = {"teacher": save(teacher, folder / "teacher.onnx"), "student": save(student, folder / "student.onnx")}
    paths["data"] = labelled_npz(folder / "data.npz", teacher, samples=96, seed=1)
    paths["eval"] = labelled_npz(folder / "eval.npz", teacher, samples=64, seed=2)
    return paths


def _arrays(path: Path) -> TrainData:
    d = np.load(path)
    return TrainData({"input": d["input"]}, d["y"])


def _module(path: Path):
    from onnxopt.bridge import to_torch

    return to_torch(onnx.load(path))


@pytest.mark.parametrize("method", ["none", "kd", "dkd", "dist", "ofa", "fitnet", "fsp", "at", "kd+at"])
def test_every_method_trains_the_student(pair, method):
    student = _module(pair["student"])
    teacher = OrtTeacher(onnx.load(pair["teacher"]))
    cfg = DistillConfig(method=method, epochs=4, lr=0.05, batch_size=32, seed=0, threads=1)
    result = train(student, None if method == "none" else teacher, _arrays(pair["data"]), _arrays(pair["eval"]),
                   cfg, input_names=["input"])
    assert len(result.history) == 4 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.best_metric is not None and result.best_metric >= result.initial_metric
    assert result.teacher_metric == (None if method == "none" else 1.0)
    if method in ("fitnet", "fsp", "at", "kd+at"):
        assert result.pairs and result.pairs[0]["resolution"] == [8, 8]
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 1.5


def test_unlabelled_data_uses_teacher_only_and_feature_only_needs_labels(pair):
    data = _arrays(pair["data"])
    unlabelled = TrainData(data.inputs, None)
    teacher = OrtTeacher(onnx.load(pair["teacher"]))
    result = train(_module(pair["student"]), teacher, unlabelled, TrainData(_arrays(pair["eval"]).inputs),
                   DistillConfig(method="kd", epochs=6, lr=0.1, seed=0), input_names=["input"])
    assert result.metric_name == "teacher_agreement" and result.best_metric > result.initial_metric
    assert "unlabelled" in result.data
    with pytest.raises(BadInputError, match="needs labelled"):
        train(_module(pair["student"]), teacher, unlabelled, None, DistillConfig(method="at"), input_names=["input"])


def test_checkpoint_resume_matches_one_run(pair, tmp_path):
    teacher = OrtTeacher(onnx.load(pair["teacher"]))
    data = _arrays(pair["data"])
    straight = _module(pair["student"])
    train(straight, teacher, data, None, DistillConfig(epochs=3, seed=0), input_names=["input"])

    calls = []

    def crash_in_third_epoch(inputs, rng):  # 2 batches per epoch: the 5th batch is epoch 3's first
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return inputs

    with pytest.raises(KeyboardInterrupt):
        train(_module(pair["student"]), teacher, data, None,
              DistillConfig(epochs=3, seed=0, checkpoint_dir=str(tmp_path), augment=crash_in_third_epoch),
              input_names=["input"])
    resumed = _module(pair["student"])
    result = train(resumed, teacher, data, None, DistillConfig(epochs=3, seed=0, checkpoint_dir=str(tmp_path),
                                                               resume=True), input_names=["input"])
    assert result.resumed_from == 1 and len(result.history) == 3
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_early_stopping_keeps_best(pair):
    teacher = OrtTeacher(onnx.load(pair["teacher"]))
    result = train(_module(pair["student"]), teacher, _arrays(pair["data"]), _arrays(pair["eval"]),
                   DistillConfig(epochs=6, lr=1e-12, patience=2, seed=0), input_names=["input"])
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 0


def test_nan_loss_stops_and_keeps_best_checkpoint(pair, tmp_path):
    teacher = OrtTeacher(onnx.load(pair["teacher"]))
    with pytest.raises(TrainingDivergedError, match="NaN/Inf") as info:
        train(_module(pair["student"]), teacher, _arrays(pair["data"]), _arrays(pair["eval"]),
              DistillConfig(epochs=8, lr=1e12, momentum=0.0, seed=0, checkpoint_dir=str(tmp_path)),
              input_names=["input"])
    assert "best.pt" in str(info.value) and (tmp_path / "best.pt").is_file()
    assert info.value.exit_code == 2


def test_clip_grad_norm_bounds_each_step(pair):
    """Plain SGD (no momentum, decay or schedule) at lr 1 moves the weights by lr x the gradient's norm: clipped to
    1e-3, one epoch of 3 steps moves them by at most 3e-3 in L2; unclipped, by far more."""
    import torch

    def moved(clip: float) -> float:
        student = _module(pair["student"])
        before = torch.cat([p.detach().flatten().clone() for p in student.parameters() if p.requires_grad])
        cfg = DistillConfig(method="none", epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant",
                            batch_size=32, seed=0, clip_grad_norm=clip)
        train(student, None, _arrays(pair["data"]), None, cfg, input_names=["input"])
        after = torch.cat([p.detach().flatten() for p in student.parameters() if p.requires_grad])
        return float((after - before).norm())

    assert moved(1e-3) <= 3e-3 * (1 + 1e-4)
    assert moved(0.0) > 0.1
    with pytest.raises(ValueError, match="clip_grad_norm"):
        DistillConfig(clip_grad_norm=-1.0)


def test_augmentation_hooks():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    rng = np.random.default_rng(0)
    shifted = make_augment("shift:1")({"input": x}, rng)["input"]
    flipped = make_augment("flip:1.0")({"input": x}, rng)["input"]
    assert shifted.shape == x.shape and not np.array_equal(shifted, x)
    np.testing.assert_array_equal(flipped, x[..., ::-1])
    with pytest.raises(ValueError):
        make_augment("rotate")


# ------------------------------------------------------------------------------------------------------ bad input


def test_incompatible_outputs_are_refused(pair, tmp_path):
    other = save(conv_classifier(num_classes=6, channels=8, seed=3), tmp_path / "six.onnx")
    with pytest.raises(BadInputError, match="incompatible"):
        train(_module(pair["student"]), OrtTeacher(onnx.load(other)), _arrays(pair["data"]), None,
              DistillConfig(), input_names=["input"])


def test_data_not_matching_teacher_is_refused(pair, tmp_path):
    big = save(conv_classifier(channels=8, size=16, batch=2, seed=3), tmp_path / "fixed.onnx")
    with pytest.raises(BadInputError, match="teacher cannot run"):
        train(_module(pair["student"]), OrtTeacher(onnx.load(big)), _arrays(pair["data"]), None, DistillConfig(),
              input_names=["input"])


def test_student_without_weights_is_refused(pair, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "noweights", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    from onnxopt.bridge import to_torch

    data = TrainData({"input": np.ones((8, 4, 8, 8), np.float32)}, np.zeros(8, np.int64))
    with pytest.raises(BadInputError, match="no trainable weights"):
        train(to_torch(model), None, data, None, DistillConfig(method="none"), input_names=["input"])


def test_cli_distill_and_bad_input_exit_codes(pair, tmp_path):
    from onnxopt.cli import main

    out = tmp_path / "out.onnx"
    args = [str(pair["student"]), "--teacher", str(pair["teacher"]), "-o", str(out), "--data", str(pair["data"]),
            "--eval", str(pair["eval"]), "--epochs", "3", "--lr", "0.05", "--no-latency", "-q"]
    assert main(["distill", *args]) == 0
    trained, original = onnx.load(out), onnx.load(pair["student"])
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in original.graph.node]
    report = __import__("json").loads(Path(f"{out}.report.json").read_text())
    step = report["steps"][-1]
    assert step["metrics"]["accuracy"] > report["steps"][0]["metrics"]["accuracy"]
    pool = tmp_path / "pool.npz"
    np.savez(pool, input=np.random.default_rng(9).normal(size=(64, 3, 8, 8)).astype(np.float32))
    semi = tmp_path / "semi.onnx"
    assert main(["distill", *args[:-4], "--unlabelled", str(pool), "-o", str(semi), "--epochs", "2", "-q",
                 "--no-latency", "--method", "dist"]) == 0
    details = __import__("json").loads(Path(f"{semi}.report.json").read_text())["steps"][-1]["details"]
    assert details["data"] == "160 samples (96 labelled)"
    six = save(conv_classifier(num_classes=6, channels=8, seed=3), tmp_path / "six.onnx")
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 3, 9, 9), np.float32))
    assert main(["distill", str(pair["student"]), "--teacher", str(six), "-o", str(tmp_path / "x.onnx"),
                 "--data", str(pair["data"]), "--no-latency", "-q"]) == 2
    assert main(["distill", str(pair["student"]), "--teacher", str(pair["teacher"]), "-o", str(tmp_path / "y.onnx"),
                 "--data", str(bad), "--no-latency", "-q"]) == 2
    assert main(["distill", *args[:-4], "--method", "nope", "-q"]) == 2
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


@register
@dataclass
class _Damage(OnnxoptPass):
    """Stands in for pruning: zeroes the classifier weights, so the model has something to recover."""

    name: ClassVar[str] = "test_distill_damage"
    exact: ClassVar[bool] = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.initializers.values():
            if value.name == "fc.weight":
                value.const_value = ir.tensor(np.zeros(value.const_value.shape, np.float32))
        return ir.passes.PassResult(model, modified=True)


def test_pass_in_a_recipe_defaults_to_the_input_model_as_teacher(pair):
    """What the pruning recipe does: a later pass changed the model; distill pulls it back to the original."""
    from onnxopt.api import optimize
    from onnxopt.passes.distill.pass_ import DistillPass

    result = optimize(str(pair["teacher"]), [_Damage(), DistillPass(epochs=8, lr=0.1, seed=0)], str(pair["data"]),
                      str(pair["eval"]), measure_latency=False)
    accuracies = [s.metrics.accuracy for s in result.report.steps]
    assert accuracies[1] < 0.6 and accuracies[2] > accuracies[1] + 0.2


def test_qat_on_a_quantized_model_keeps_qdq_and_int8_weights(pair):
    from onnxopt.passes.distill.pass_ import DistillPass
    from onnxopt.passes.quantize.pass_ import QuantizePass
    from onnxopt.pipeline.context import PassContext
    from onnxopt.calib_data import open_data

    calib = open_data(str(pair["data"]))
    quantizer = QuantizePass(placement="all")
    quantizer.bind(PassContext(calib=calib))
    qdq = quantizer.apply(onnx.load(pair["student"]))
    assert any(n.op_type == "DequantizeLinear" for n in qdq.graph.node)
    step = DistillPass(teacher=str(pair["teacher"]), epochs=3, lr=0.05, stochastic_rounding=True, seed=0)
    step.bind(PassContext(calib=calib, eval=open_data(str(pair["eval"]))))
    tuned = step.apply(qdq)
    assert step.details["qat"] is True and step.details["stochastic_rounding"] is True
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in qdq.graph.node]
    before = {i.name: i for i in qdq.graph.initializer}
    changed = [i.name for i in tuned.graph.initializer
               if i.data_type in (TensorProto.INT8, TensorProto.UINT8) and i.name in before
               and i.data_type == before[i.name].data_type
               and not np.array_equal(onnx.numpy_helper.to_array(i), onnx.numpy_helper.to_array(before[i.name]))]
    assert changed, "no int8 weight changed"
    # the float16-packed biases were trained as float32 parameters and packed again
    def halves(model):
        return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                if i.data_type == TensorProto.FLOAT16}

    halves, after = halves(qdq), halves(tuned)
    assert halves and sorted(a.size for a in halves.values()) == sorted(a.size for a in after.values())
    assert not all(any(np.array_equal(a, b) for b in halves.values()) for a in after.values())
    d = np.load(pair["eval"])
    assert np.isfinite(run(tuned, {"input": d["input"]})[0]).all()


# ------------------------------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, port: int, teacher: str, student: str, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    torch.set_num_threads(1)
    from onnxopt.bridge import to_torch

    module = to_torch(onnx.load(student))
    d = np.load(data)
    train(module, OrtTeacher(onnx.load(teacher)), TrainData({"input": d["input"]}, d["y"]), None,
          DistillConfig(epochs=2, lr=0.05, batch_size=16, seed=0), input_names=["input"])
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_cpu_processes_stay_in_sync(pair, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(port, str(pair["teacher"]), str(pair["student"]), str(pair["data"]), out),
             nprocs=2, join=True)
    a, b = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    start = _module(pair["student"]).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_registered_lazily():
    from onnxopt.pipeline import registry

    assert "distill" in registry.available()
    assert registry.get("distill").name == "distill"
    with pytest.raises(DataError, match="training data"):
        registry.create("distill", {"epochs": "1"}).apply(conv_classifier())


def test_torch_teacher_agrees_with_ort_teacher(pair):
    from onnxopt.passes.distill.teacher import TorchTeacher

    model = onnx.load(pair["teacher"])
    x = {"input": np.load(pair["eval"])["input"][:16]}
    (a, fa), (b, fb) = OrtTeacher(model).run(x, ["relu_out"]), TorchTeacher(model).run(x, ["relu_out"])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fb["relu_out"], fa["relu_out"], rtol=1e-4, atol=1e-5)
    result = train(_module(pair["student"]), TorchTeacher(model), _arrays(pair["data"]), None,
                   DistillConfig(method="kd+fitnet", epochs=1, seed=0), input_names=["input"])
    assert result.pairs and math.isfinite(result.history[0]["loss"])


def test_bad_pass_parameters_are_recipe_errors():
    from onnxopt.errors import RecipeError
    from onnxopt.pipeline import registry

    for params in ({"method": "crd"}, {"optimizer": "lbfgs"}, {"alpha": "2"}, {"augment": "rotate"},
                   {"qat": "maybe"}):
        with pytest.raises(RecipeError):
            registry.create("distill", params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_cuda_without_gpu_is_a_clear_error(pair):
    with pytest.raises(BadInputError, match="no CUDA GPU"):
        train(_module(pair["student"]), None, _arrays(pair["data"]), None,
              DistillConfig(method="none", device="cuda"), input_names=["input"])


def test_data_not_matching_student_is_refused(pair):
    data = TrainData({"input": np.zeros((4, 5, 8, 8), np.float32)}, np.zeros(4, np.int64))
    with pytest.raises(BadInputError, match="student cannot run on the training data"):
        train(_module(pair["student"]), None, data, None, DistillConfig(method="none"), input_names=["input"])


def test_python_api_with_model_teacher_and_callable_augment(pair, tmp_path):
    from onnxopt.passes.distill import distill

    calls = []

    def jitter(inputs, rng):
        calls.append(len(next(iter(inputs.values()))))
        return {k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in inputs.items()}

    result = distill(str(pair["student"]), onnx.load(pair["teacher"]), str(pair["data"]), eval=str(pair["eval"]),
                     output=tmp_path / "api.onnx", epochs=4, lr=0.1, batch_size=16, augment=jitter,
                     measure_latency=False)
    step = result.report.steps[-1]
    assert step.params["teacher"].startswith("python model sha256:")
    assert step.details["teacher"] == step.params["teacher"]
    assert calls and (tmp_path / "api.onnx").is_file()
    assert step.metrics.accuracy > result.report.steps[0].metrics.accuracy


def test_min_steps_adds_epochs_until_enough_optimizer_steps(pair):
    """96 samples at batch 32 are 3 steps per epoch: min_steps=10 turns 2 epochs into 4; fewer steps change nothing."""
    teacher = OrtTeacher(onnx.load(pair["teacher"]))
    for min_steps, epochs in ((10, 4), (3, 2)):
        cfg = DistillConfig(method="kd", epochs=2, lr=0.05, batch_size=32, seed=0, threads=1, min_steps=min_steps)
        result = train(_module(pair["student"]), teacher, _arrays(pair["data"]), None, cfg, input_names=["input"])
        assert len(result.history) == epochs


def test_split_holdout_is_seeded_stratified_and_disjoint():
    from onnxopt.passes.distill.data import split_holdout

    labels = np.repeat(np.arange(4), [40, 30, 20, 1])  # the class with one sample stays in training
    data = TrainData({"input": np.arange(len(labels), dtype=np.float32)[:, None]}, labels)
    train_part, held = split_holdout(data, 0.1, seed=3)
    assert sorted(np.bincount(held.labels, minlength=4)) == [0, 2, 3, 4]
    assert len(train_part) + len(held) == len(data)
    assert not set(train_part.inputs["input"][:, 0]) & set(held.inputs["input"][:, 0])
    again = split_holdout(data, 0.1, seed=3)[1]
    assert np.array_equal(again.inputs["input"], held.inputs["input"])
    with pytest.raises(DataError, match="too few"):
        split_holdout(TrainData({"input": np.zeros((1, 1), np.float32)}, np.zeros(1)), 0.1, seed=0)


@pytest.mark.parametrize("select_on", ["eval", "holdout", "last"])
def test_what_picks_the_kept_epoch(pair, monkeypatch, select_on):
    """holdout picks the epoch on a slice of the training data and never loads the eval data (which optimize then
    judges the budgets on); eval picks on the eval data; last keeps the final epoch."""
    from onnxopt.api import optimize
    from onnxopt.passes.distill import data as data_mod
    from onnxopt.passes.distill.pass_ import DistillPass

    loaded: list[str] = []
    real_load = data_mod.load

    def spy(source, specs, **kwargs):
        loaded.append(kwargs.get("what", ""))
        return real_load(source, specs, **kwargs)

    monkeypatch.setattr(data_mod, "load", spy)
    step = DistillPass(teacher=str(pair["teacher"]), epochs=3, lr=0.05, select_on=select_on, holdout_fraction=0.25)
    result = optimize(str(pair["student"]), [step], str(pair["data"]), str(pair["eval"]), measure_latency=False)
    details, notes = result.report.steps[-1].details, " ".join(result.report.steps[-1].notes)
    assert ("distill evaluation data" in loaded) == (select_on == "eval")
    if select_on == "last":
        assert details["best_epoch"] is None and "kept epoch" not in notes
    else:
        assert details["best_epoch"] in (1, 2, 3)
        assert ("held-out 24 training samples accuracy" in notes) == (select_on == "holdout")
    assert f"on {72 if select_on == 'holdout' else 96} samples (labelled)" in notes  # the holdout is not trained on


def test_chunks_fill_a_fixed_batch_from_the_start():
    from onnxopt.passes.distill.trainer import chunks

    assert [(list(i), n) for i, n in chunks(5, 2)] == [([0, 1], 2), ([2, 3], 2), ([4], 1)]
    assert [(list(i), n) for i, n in chunks(5, 64, fixed=3)] == [([0, 1, 2], 3), ([3, 4, 0], 2)]
    assert [(list(i), n) for i, n in chunks(2, 64, fixed=3)] == [([0, 1, 0], 2)]  # fewer samples than one batch


@pytest.fixture(scope="module")
def fixed_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``pair``'s nets with their batch fixed at 3 (as onnx's torch test models fix it), 50 training / 20 evaluation
    samples (neither a multiple of 3), labelled by the dynamic-batch teacher."""
    folder = tmp_path_factory.mktemp("distill_fixed")
    dynamic = conv_classifier(channels=16, seed=0)
    paths = {"teacher": save(conv_classifier(channels=16, seed=0, batch=3), folder / "teacher.onnx"),
             "student": save(conv_classifier(channels=8, seed=5, batch=3), folder / "student.onnx"),
             "dynamic_student": save(conv_classifier(channels=8, seed=5), folder / "dynamic_student.onnx"),
             "six": save(conv_classifier(channels=8, seed=5, batch=6), folder / "six.onnx")}
    paths["data"] = labelled_npz(folder / "data.npz", dynamic, samples=50, seed=1)
    paths["eval"] = labelled_npz(folder / "eval.npz", dynamic, samples=20, seed=2)
    return paths


@pytest.mark.parametrize("student", ["student", "dynamic_student"])
def test_fixed_batch_models_train_in_batches_of_their_size(fixed_pair, tmp_path, student):
    """ONNX Runtime runs a model that fixes its batch on that batch size only: the probe, the teacher's outputs, the
    training steps and the evaluation all use it, whether the student or only the teacher fixes it."""
    from onnxopt.cli import main

    out = tmp_path / "out.onnx"
    assert main(["distill", str(fixed_pair[student]), "--teacher", str(fixed_pair["teacher"]), "-o", str(out),
                 "--data", str(fixed_pair["data"]), "--eval", str(fixed_pair["eval"]), "--epochs", "4", "--lr",
                 "0.05", "--batch-size", "16", "--clip-grad-norm", "50", "--no-latency", "-q"]) == 0
    report = __import__("json").loads(Path(f"{out}.report.json").read_text())
    step = report["steps"][-1]
    assert step["details"]["batch_size"] == 3 and step["params"]["clip_grad_norm"] == 50.0
    which = "student" if student == "student" else "teacher"
    assert any(f"trained in batches of 3, not batch_size=16: the {which} fixes" in n for n in step["notes"])
    assert step["details"]["best_metric"] > step["details"]["initial_metric"]  # it learned from the teacher
    trained = onnx.load(out)
    assert trained.graph.input[0].type.tensor_type.shape.dim[0].dim_value == (3 if student == "student" else 0)


def test_a_dynamic_batch_written_as_minus_one_is_not_fixed(fixed_pair, tmp_path):
    """Paddle writes a dynamic dim as -1: such a teacher takes any batch, and the configured size stands."""
    from onnxopt.cli import main

    teacher = save(conv_classifier(channels=16, seed=0, batch=-1), tmp_path / "paddle_style.onnx")
    out = tmp_path / "out.onnx"
    assert main(["distill", str(fixed_pair["dynamic_student"]), "--teacher", str(teacher), "-o", str(out),
                 "--data", str(fixed_pair["data"]), "--epochs", "1", "--batch-size", "16", "--no-latency", "-q"]) == 0
    step = __import__("json").loads(Path(f"{out}.report.json").read_text())["steps"][-1]
    assert step["details"]["batch_size"] == 16 and not any("batches of" in n for n in step["notes"])


def test_student_and_teacher_fixing_different_batches_are_refused(fixed_pair, tmp_path):
    from onnxopt.cli import main

    out = tmp_path / "out.onnx"
    assert main(["distill", str(fixed_pair["six"]), "--teacher", str(fixed_pair["teacher"]), "-o", str(out),
                 "--data", str(fixed_pair["data"]), "--no-latency", "-q"]) == 2
    assert not out.exists()
