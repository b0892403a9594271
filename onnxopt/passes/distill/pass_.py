"""The ``distill`` pass: fine-tune the model in the pipeline (the student) against a teacher and write the trained
weights back into the same graph.

The teacher is a path, or by default the model the user gave the run (``context.original``), which is what
recovers accuracy after pruning (``prune -> distill``). A QDQ model (the quantize pass's output) is fine-tuned
quantization-aware. Training data is the run's calibration data (labelled when it has ``y``) plus, optionally, an
unlabelled pool that only the teacher labels (``unlabelled``); evaluation data drives early stopping and the choice
of the kept epoch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import onnx
import onnx_ir as ir

from onnxopt.calib_data.base import static_batch
from onnxopt.errors import BadInputError, DataError
from onnxopt.irutil import adopt
from onnxopt.modelio import InputSpec, input_specs, load_model, to_proto
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.registry import register


#: Python objects handed to the pass, by the string handle that stands for them in its params.
_OBJECTS: dict[str, Any] = {}


def _fixed_batch(specs: list[InputSpec], teacher: onnx.ModelProto | None) -> int | None:
    """The batch size the student or the teacher fixes (both run every batch), or None when both take any."""
    student = static_batch(specs)
    other = static_batch(input_specs(ir.serde.deserialize_model(teacher))) if teacher is not None else None
    if student is not None and other is not None and student != other:
        raise BadInputError(f"distill: the student fixes its batch size at {student} and the teacher at {other}; "
                            "both must run the same batches (export one with a dynamic batch dimension)")
    return student or other


def _handle(key: str, obj: Any) -> str:
    _OBJECTS[key] = obj
    return key


@register
@dataclass
class DistillPass(OnnxoptPass):
    """Knowledge distillation fine-tuning (logit or feature losses; QAT on QDQ models); needs training data.

    Parameters:
        teacher: teacher ONNX path (or, from Python, an onnx.ModelProto / onnx_ir.Model); empty = the run's input
            model (e.g. the unpruned original).
        unlabelled: extra training data without labels (anything --calib accepts), learnt from the teacher only.
        method: kd (default), dkd, dist, ofa, fitnet, fsp, at, a combination such as kd+at, or none (no teacher:
            cross-entropy on the labels only, the baseline).
        epochs, lr, batch_size, optimizer (sgd/adam/adamw), schedule (cosine/step/constant), weight_decay. A student
            or teacher that fixes its batch size trains in batches of that size, whatever ``batch_size`` says.
        temperature: softmax temperature of the logit losses. alpha: (1 - alpha) CE + alpha distillation.
        feature_weight: weight of the feature loss (default per method).
        patience: stop after this many epochs without improvement on the selection data (0 = run every epoch).
        select_on: what picks the kept epoch (and drives ``patience``): ``eval`` (the run's eval data, default),
            ``holdout`` (a seeded, label-stratified ``holdout_fraction`` of the training data, not trained on: the
            eval data stays unseen, so a pipeline that judges budgets on it, such as optimize, gets an unbiased
            estimate) or ``last`` (the final epoch, no selection).
        min_steps: train more epochs when needed so that at least this many optimizer steps run (recovery after
            pruning on a few hundred calibration samples needs it; the end-to-end recipe sets 300).
        clip_grad_norm: before each step, rescale the gradients to this global L2 norm at most (0 = off); for a net
            that diverges at a useful lr (a deep net without BatchNorm at batch 1).
        augment: shift[:PIXELS], flip[:P], shift+flip or none; a callable from Python.
        device: cpu or cuda. teacher_runtime: ort (default) or torch (the bridge; e.g. on the GPU).
        seed: None = the run's seed. max_samples: training samples used at most.
        checkpoint_dir / resume: save last.pt and best.pt each epoch / continue from last.pt.
        qat: auto (quantization-aware when the model has Q/DQ nodes), on, off.
        stochastic_rounding: QAT rounds stochastically in training. train_scales: QAT learns the Q/DQ scales.
        torch_threads: torch intra-op threads (None = torch's default).
    """

    name: ClassVar[str] = "distill"
    exact: ClassVar[bool] = False

    teacher: Any = None
    unlabelled: str | None = None
    method: str = "kd"
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    temperature: float = 4.0
    alpha: float = 0.9
    feature_weight: float | None = None
    patience: int = 0
    select_on: Literal["eval", "holdout", "last"] = "eval"
    holdout_fraction: float = 0.1
    min_steps: int = 0
    clip_grad_norm: float = 0.0
    augment: Any = None
    device: str = "cpu"
    teacher_runtime: Literal["ort", "torch"] = "ort"
    seed: int | None = None
    max_samples: int | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    qat: Literal["auto", "on", "off"] = "auto"
    stochastic_rounding: bool = False
    train_scales: bool = False
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_runtime not in ("ort", "torch"):
            raise ValueError(f"teacher_runtime must be ort or torch, got {self.teacher_runtime!r}")
        if self.select_on not in ("eval", "holdout", "last"):
            raise ValueError(f"select_on must be eval, holdout or last, got {self.select_on!r}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.qat not in ("auto", "on", "off"):
            raise ValueError(f"qat must be auto, on or off, got {self.qat!r}")
        # Python objects (a teacher model, an augmentation callable) are replaced by string handles, so that the
        # pass's params stay JSON-able and a recipe rebuilt from them (Recipe.from_list) finds the same objects.
        if self.teacher is not None and not isinstance(self.teacher, str):
            proto = self.teacher if isinstance(self.teacher, onnx.ModelProto) else to_proto(self.teacher)
            self.teacher = _handle(f"python model sha256:{hashlib.sha256(proto.SerializeToString()).hexdigest()[:16]}",
                                   proto)
        if self.augment is not None and not isinstance(self.augment, str):
            if not callable(self.augment):
                raise ValueError(f"augment must be a spec string or a callable, got {type(self.augment).__name__}")
            self.augment = _handle(f"python callable {getattr(self.augment, '__name__', 'augment')} "
                                   f"{id(self.augment):x}", self.augment)
        if isinstance(self.augment, str) and self.augment not in _OBJECTS:
            from onnxopt.passes.distill.data import make_augment

            make_augment(self.augment)
        self._config()  # validates method, optimizer, schedule, numbers

    def _config(self, seed: int = 0) -> Any:
        from onnxopt.passes.distill.data import make_augment
        from onnxopt.passes.distill.trainer import DistillConfig

        augment = _OBJECTS[self.augment] if self.augment in _OBJECTS else make_augment(self.augment)
        return DistillConfig(
            method=self.method, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, optimizer=self.optimizer,
            schedule=self.schedule, weight_decay=self.weight_decay, temperature=self.temperature, alpha=self.alpha,
            feature_weight=self.feature_weight, patience=self.patience, min_steps=self.min_steps,
            clip_grad_norm=self.clip_grad_norm,
            checkpoint_dir=self.checkpoint_dir,
            resume=self.resume, seed=self.seed if self.seed is not None else seed, device=self.device,
            threads=self.torch_threads, quiet=self.context.quiet if hasattr(self, "context") else True,
            augment=augment)

    def _teacher_proto(self) -> onnx.ModelProto | None:
        from onnxopt.passes.distill.trainer import parse_method

        if parse_method(self.method) == (None, []):
            return None
        if self.teacher in _OBJECTS:
            return _OBJECTS[self.teacher]
        if self.teacher:
            return to_proto(load_model(self.teacher))
        if self.context.original is None:
            raise BadInputError("distill: no teacher (give teacher=PATH; run inside a pipeline to default to the "
                                "input model)")
        return to_proto(self.context.original)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxopt.passes.distill import qat as qat_mod
        from onnxopt.passes.distill.data import load, merge, split_holdout
        from onnxopt.passes.distill.teacher import OrtTeacher, TorchTeacher, logits_value
        from onnxopt.passes.distill.trainer import train

        if self.context.calib is None:
            raise DataError("distill needs training data (--data / calib)")
        cfg = self._config(self.context.seed)
        student = to_proto(model)
        from onnxopt.passes.quantize.compact import pack_half_constants, unpack_half_constants

        # float16-packed scales and biases (the quantize pass's compact QDQ file) train as float32 initializers
        quantized = qat_mod.is_qdq(student)
        packed = False
        if quantized:
            nodes = len(student.graph.node)
            packed = len(unpack_half_constants(student).graph.node) < nodes
        specs = input_specs(model)
        data = load(self.context.calib, specs, max_samples=self.max_samples, what="distill training data")
        eval_data = None
        if self.select_on == "holdout":  # before the unlabelled pool joins: hold out the user's own samples
            data, eval_data = split_holdout(data, self.holdout_fraction, cfg.seed)
        elif self.select_on == "eval" and self.context.eval:
            eval_data = load(self.context.eval, specs, what="distill evaluation data")
        if self.unlabelled:
            from onnxopt.calib_data import open_data

            pool = load(open_data(self.unlabelled, seed=self.context.seed, input_shapes=self.context.input_shapes),
                        specs, max_samples=self.max_samples, what="distill unlabelled data")
            data = merge(data, pool)
        use_qat = self.qat == "on" or (self.qat == "auto" and quantized)
        if self.qat == "on" and not quantized:
            raise BadInputError("distill: qat=on but the student has no QuantizeLinear/DequantizeLinear nodes "
                                "(quantize it with --format qdq first)")
        module = qat_mod.prepare(student, qat=use_qat, stochastic_rounding=self.stochastic_rounding,
                                 train_scales=self.train_scales)
        teacher_proto = self._teacher_proto()
        teacher: Any = None
        if teacher_proto is not None:
            teacher = (TorchTeacher(teacher_proto, device=cfg.device) if self.teacher_runtime == "torch"
                       else OrtTeacher(teacher_proto, provider=self.context.provider, threads=self.context.threads))
        out_name = student.graph.output[0].name
        logits = logits_value(student)
        batch = _fixed_batch(specs, teacher_proto)
        result = train(module, teacher, data, eval_data, cfg, input_names=[s.name for s in specs],
                       logits_name=None if logits == out_name else logits, what="student", fixed_batch=batch)

        from onnxopt.bridge import write_back

        trained = write_back(module, student)
        if packed:
            pack_half_constants(trained)
        adopt(model, ir.serde.deserialize_model(trained))
        self.details.update(result.to_dict())
        self.details.update(qat=use_qat, stochastic_rounding=use_qat and self.stochastic_rounding,
                            teacher=self.teacher or ("input model" if teacher is not None else None),
                            teacher_runtime=self.teacher_runtime if teacher is not None else None)
        self.note(f"{'quantization-aware ' if use_qat else ''}fine-tuning by {cfg.method} on {result.data}, "
                  f"{result.epochs_run} epoch(s){' (stopped early)' if result.stopped_early else ''}")
        if batch is not None and batch != cfg.batch_size:
            self.note(f"trained in batches of {batch}, not batch_size={cfg.batch_size}: the "
                      f"{'student' if static_batch(specs) == batch else 'teacher'} fixes its batch size (ONNX "
                      "Runtime, and the Reshapes of such graphs, take no other)")
        if result.metric_name:
            first = "n/a" if result.initial_metric is None else f"{result.initial_metric:.4f}"
            where = (f"held-out {len(eval_data)} training samples" if self.select_on == "holdout"
                     else "eval")
            self.note(f"{where} {result.metric_name}: {first} -> {result.best_metric:.4f} (kept epoch "
                      f"{result.best_epoch})" + (f"; teacher {result.teacher_metric:.4f}"
                                                 if result.teacher_metric is not None else ""))
        if result.pairs:
            self.note("feature pairs: " + "; ".join(f"{p['resolution'][0]}x{p['resolution'][1]} "
                                                    f"{p['student'][1]} -> {p['teacher'][1]}" for p in result.pairs))
        return ir.passes.PassResult(model, modified=True)
