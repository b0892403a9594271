"""The distillation training loop: a torch student (the bridged ONNX graph, or any module with the bridge's
``run_with_features`` / ``value_names`` interface) learns from a teacher's outputs and, where labels exist, from
the labels.

One loop serves every method (``method="kd"``, ``"dkd"``, ``"dist"``, ``"ofa"``, ``"fitnet"``, ``"fsp"``, ``"at"``,
combinations such as ``"kd+at"``, and ``"none"``, the no-teacher baseline with the same budget), labelled and
unlabelled data (label -1), augmentation, early stopping on evaluation data, checkpoint/resume, and DDP when
launched by ``torchrun`` (one shard of every epoch per process, gradients all-reduced, rank 0 writes).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import gc
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from onnxopt.errors import BadInputError, PassFailedError
from onnxopt.passes.distill import losses
from onnxopt.passes.distill.data import AugmentFn, TrainData
from onnxopt.passes.distill.matching import StagePair, match_by_resolution, stages
from onnxopt.passes.distill.teacher import _NOT_FEATURES

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
#: Teacher outputs for the whole training set are cached up front when they fit in this many bytes.
CACHE_LIMIT_BYTES = 1 << 30
PROBE_SAMPLES = 3


class TrainingDivergedError(PassFailedError):
    """The loss became NaN/Inf; the best weights so far were restored (and saved when there is a checkpoint dir)."""


@dataclass
class DistillConfig:
    """Everything that shapes one training run (the pass's and the CLI's options map onto these fields)."""

    method: str = "kd"
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 0  # step schedule: epochs per decay (0 = a third of the epochs)
    gamma: float = 0.1
    temperature: float = 4.0
    #: weight of the distillation term against cross-entropy on labelled samples: (1 - alpha) CE + alpha KD.
    alpha: float = 0.9
    #: weight of the feature term (None = per-method default, losses.FEATURE_WEIGHTS).
    feature_weight: float | None = None
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    ofa_eps: float = 1.0
    max_pairs: int = 3
    patience: int = 0  # epochs without improvement on eval data before stopping (0 = never stop early)
    #: Raise the epoch count until at least this many optimizer steps run: recovery after pruning needs a few hundred
    #: steps, which a small calibration set gives only over many epochs (0 = train exactly ``epochs``).
    min_steps: int = 0
    #: Rescale the gradients so that their global L2 norm is at most this before each step (0 = never): a deep net
    #: without BatchNorm at batch 1 can diverge in a few steps (Caffe2's VGG-19 at lr 0.01, reports/corpus.md).
    clip_grad_norm: float = 0.0
    checkpoint_dir: str | None = None
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    quiet: bool = True
    augment: AugmentFn | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parse_method(self.method)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.clip_grad_norm >= 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0 = off), got {self.clip_grad_norm}")


def parse_method(method: str) -> tuple[str | None, list[str]]:
    """``"kd+at"`` -> ("kd", ["at"]); ``"none"`` -> (None, []). At most one logit loss."""
    parts = [p.strip().lower() for p in method.split("+") if p.strip()]
    if parts in ([], ["none"], ["baseline"]):
        return None, []
    known = (*losses.LOGIT_METHODS, *losses.FEATURE_METHODS)
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise ValueError(f"unknown distillation method {unknown[0]!r} (known: none, {', '.join(known)}, "
                         "or a combination such as kd+at)")
    logit = [p for p in parts if p in losses.LOGIT_METHODS]
    if len(logit) > 1:
        raise ValueError(f"method {method!r} combines {len(logit)} logit losses; use one")
    return (logit[0] if logit else None), [p for p in parts if p in losses.FEATURE_METHODS]


@dataclass
class TrainResult:
    """What happened: per-epoch history, the epoch whose weights were kept, and the evaluation metric."""

    method: str
    history: list[dict[str, float]]
    best_epoch: int | None
    best_metric: float | None
    metric_name: str | None
    initial_metric: float | None
    teacher_metric: float | None
    epochs_run: int
    stopped_early: bool
    pairs: list[dict[str, Any]]
    data: str
    resumed_from: int | None = None
    #: Samples per training step (the configured batch size, or the one the student or teacher fixes).
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- modules


class _TrainModule(nn.Module):
    """Student + adapters/projectors in one module (one DDP wrapper, one state dict); forward returns every tensor
    the losses need."""

    def __init__(self, student: nn.Module, logits_name: str | None, pairs: Sequence[StagePair],
                 features: Sequence[str], ofa_stages: Sequence[tuple[str, int]], num_classes: int):
        super().__init__()
        self.student = student
        self.logits_name = logits_name
        self.pairs = list(pairs)
        self.features = list(features)
        self.ofa_stages = list(ofa_stages)
        self.adapters = nn.ModuleDict()
        for i, pair in enumerate(self.pairs):
            if "fitnet" in self.features:
                self.adapters[f"hint{i}"] = losses.Adapter(pair.student.last_channels, pair.teacher.last_channels)
            if "fsp" in self.features:
                self.adapters[f"fsp{i}a"] = losses.Adapter(pair.student.first_channels, pair.teacher.first_channels)
                self.adapters[f"fsp{i}b"] = losses.Adapter(pair.student.last_channels, pair.teacher.last_channels)
        self.projectors = nn.ModuleList(losses.LogitProjector(c, num_classes) for _, c in self.ofa_stages)
        names = {p.student.last for p in self.pairs} | {n for n, _ in self.ofa_stages}
        if "fsp" in self.features:
            names |= {p.student.first for p in self.pairs}
        if logits_name:
            names.add(logits_name)
        self.capture = sorted(names)

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.capture:
            out, feats = self.student.run_with_features(*inputs, capture=self.capture)
        else:
            out, feats = self.student(*inputs), {}
        logits = feats[self.logits_name] if self.logits_name else (out[0] if isinstance(out, tuple) else out)
        result = {"logits": logits.flatten(1)}
        for i, pair in enumerate(self.pairs):
            last = feats[pair.student.last]
            if "fitnet" in self.features:
                result[f"hint{i}"] = self.adapters[f"hint{i}"](last)
            if "at" in self.features:
                result[f"at{i}"] = last
            if "fsp" in self.features:
                result[f"fsp{i}a"] = self.adapters[f"fsp{i}a"](feats[pair.student.first])
                result[f"fsp{i}b"] = self.adapters[f"fsp{i}b"](last)
        for i, (name, _) in enumerate(self.ofa_stages):
            result[f"ofa{i}"] = self.projectors[i](feats[name])
        return result


def _student_of(module: nn.Module) -> _TrainModule:
    return module.module if hasattr(module, "module") else module  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ losses


def _loss(out: dict[str, torch.Tensor], t_logits: torch.Tensor | None, t_feats: dict[str, torch.Tensor],
          labels: torch.Tensor | None, cfg: DistillConfig, logit_method: str | None, features: Sequence[str],
          n_pairs: int, n_ofa: int) -> tuple[torch.Tensor, dict[str, float]]:
    logits = out["logits"]
    parts: dict[str, torch.Tensor] = {}
    labelled = labels >= 0 if labels is not None else None
    has_ce = labelled is not None and bool(labelled.any())
    if has_ce:
        assert labels is not None and labelled is not None
        parts["ce"] = F.cross_entropy(logits[labelled], labels[labelled])
    if logit_method is not None:
        assert t_logits is not None
        target = t_logits.argmax(1)
        if labelled is not None and labels is not None:
            target = torch.where(labelled, labels, target)
        T = cfg.temperature
        if logit_method == "kd":
            parts["kd"] = losses.kd_loss(logits, t_logits, T)
        elif logit_method == "dkd":
            parts["dkd"] = losses.dkd_loss(logits, t_logits, target, T, cfg.dkd_alpha, cfg.dkd_beta)
        elif logit_method == "dist":
            parts["dist"] = losses.dist_loss(logits, t_logits, T)
        elif logit_method == "ofa":
            branch = [losses.ofa_loss(out[f"ofa{i}"], t_logits, target, 1.0, cfg.ofa_eps) for i in range(n_ofa)]
            parts["ofa"] = (losses.ofa_loss(logits, t_logits, target, 1.0, cfg.ofa_eps) + sum(branch)) / (1 + n_ofa)
    total = logits.new_zeros(())
    if logit_method is not None:
        distill = parts[logit_method]
        total = total + (cfg.alpha * distill + (1 - cfg.alpha) * parts["ce"] if has_ce else distill)
    elif has_ce:
        total = total + parts["ce"]
    for name in features:
        weight = cfg.feature_weight if cfg.feature_weight is not None else losses.FEATURE_WEIGHTS[name]
        terms = []
        for i in range(n_pairs):
            if name == "fitnet":
                terms.append(losses.hint_loss(out[f"hint{i}"], t_feats[f"last{i}"]))
            elif name == "at":
                terms.append(losses.at_loss(out[f"at{i}"], t_feats[f"last{i}"]))
            elif name == "fsp":
                terms.append(losses.fsp_loss((out[f"fsp{i}a"], out[f"fsp{i}b"]),
                                             (t_feats[f"first{i}"], t_feats[f"last{i}"])))
        parts[name] = torch.stack(terms).mean()
        total = total + weight * parts[name]
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------------ helpers


def _distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group when torchrun's environment asks for one."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("ONNXOPT_DDP_NCCL") else "gloo")
        atexit.register(_destroy_process_group)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _destroy_process_group() -> None:
    """Tear the group down while the interpreter is still whole: gloo's worker threads that outlive finalization
    abort the process ("terminate called without an active exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device '{name}' requested but torch sees no CUDA GPU (torch {torch.__version__})")
    if name.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _tensors(inputs: dict[str, np.ndarray], names: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in names]


def chunks(size: int, batch: int, fixed: int | None = None) -> list[tuple[np.ndarray, int]]:
    """(sample indices, how many of them are new) for each run over ``size`` samples in chunks of ``batch``.

    A model that fixes its batch size (Caffe2's 1, onnx's torch test models' 3 or 20) runs nothing else: with
    ``fixed`` every chunk holds exactly that many indices, the last one filled up with samples from the start (their
    outputs are dropped), and a set smaller than one batch is repeated."""
    step = fixed or batch
    return [(np.arange(start, start + step) % size if fixed else np.arange(start, min(start + step, size)),
             min(step, size - start)) for start in range(0, size, step)]


def _take(inputs: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in inputs.items()}


def _metric(module: _TrainModule, data: TrainData, names: Sequence[str], device: torch.device,
            reference: np.ndarray | None, batch: int = 256, fixed: int | None = None) -> float:
    """Accuracy on labelled eval data, else top-1 agreement with ``reference`` (the teacher's predictions)."""
    was_training = module.training
    module.eval()
    preds = []
    with torch.no_grad():
        for index, new in chunks(len(data), batch, fixed):
            logits = module(*_tensors(_take(data.inputs, index), names, device))["logits"]
            preds.append(logits.argmax(1).cpu().numpy()[:new])
    module.train(was_training)
    pred = np.concatenate(preds)
    if data.labels is not None:
        mask = data.labels >= 0
        return float((pred[mask] == data.labels[mask]).mean())
    assert reference is not None
    return float((pred == reference).mean())


def _optimizer(params: list[nn.Parameter], cfg: DistillConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: DistillConfig, steps_per_epoch: int) -> Any:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if cfg.schedule == "step":
        every = (cfg.step_size or max(1, cfg.epochs // 3)) * steps_per_epoch
        return torch.optim.lr_scheduler.StepLR(opt, every, cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


class _TeacherOutputs:
    """Teacher logits and paired features per sample: cached for the whole set when it fits and no augmentation
    changes the inputs, else computed batch by batch."""

    def __init__(self, teacher: Any, pairs: Sequence[StagePair], features: Sequence[str], data: TrainData,
                 cached: bool, fixed: int | None = None):
        self.teacher = teacher
        self.fixed = fixed
        self.names: dict[str, str] = {}
        for i, pair in enumerate(pairs):
            self.names[f"last{i}"] = pair.teacher.last
            if "fsp" in features:
                self.names[f"first{i}"] = pair.teacher.first
        self.cache: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
        if cached:
            self.cache = self.compute(data.inputs)

    def compute(self, inputs: dict[str, np.ndarray], batch: int = 128) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logits, feats = [], {k: [] for k in self.names}
        size = len(next(iter(inputs.values())))
        wanted = list(dict.fromkeys(self.names.values()))
        for index, new in chunks(size, batch, self.fixed):
            lg, fs = self.teacher.run(_take(inputs, index), wanted)
            logits.append(lg.reshape(len(lg), -1)[:new])
            for key, name in self.names.items():
                feats[key].append(fs[name][:new])
        return np.concatenate(logits), {k: np.concatenate(v) for k, v in feats.items()}

    def get(self, index: np.ndarray, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self.cache is not None:
            return self.cache[0][index], {k: v[index] for k, v in self.cache[1].items()}
        return self.compute(inputs, batch=max(1, len(index)))


def probe_values(student: nn.Module, inputs: list[torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float value of a bridged student on ``inputs`` (eval mode), in execution order."""
    names = [v for v, _node, op in student.value_names() if op not in _NOT_FEATURES]
    was_training = student.training
    student.eval()
    with torch.no_grad():
        _, feats = student.run_with_features(*inputs, capture=names)
    student.train(was_training)
    return [(n, tuple(t.shape)) for n in names if isinstance((t := feats.get(n)), torch.Tensor)
            and t.is_floating_point()]


# --------------------------------------------------------------------------------------------------------- train


def train(student: nn.Module, teacher: Any, data: TrainData, eval_data: TrainData | None, cfg: DistillConfig, *,
          input_names: Sequence[str], logits_name: str | None = None, what: str = "student",
          fixed_batch: int | None = None) -> TrainResult:
    """Train ``student`` in place (best weights kept when there is evaluation data) and say what happened.

    ``teacher`` is an :class:`~onnxopt.passes.distill.teacher.OrtTeacher`/``TorchTeacher`` (anything with
    ``run(inputs, features)`` and ``probe(inputs)``), or None for ``method="none"``. ``logits_name`` names the
    student value holding the logits when it is not the first output (a model ending in Softmax). ``fixed_batch``:
    the batch size the student or teacher fixes; every run of either then holds exactly that many samples (training
    batches too: ``cfg.batch_size`` gives way).
    """
    if fixed_batch is not None:
        cfg = dataclasses.replace(cfg, batch_size=fixed_batch)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = _distributed()
    device = _device(cfg.device)
    logit_method, features = parse_method(cfg.method)
    distilling = logit_method is not None or bool(features)

    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise BadInputError(f"{what} has no trainable weights (no float initializers feed its computation); "
                            "nothing to distill")
    if distilling and teacher is None:
        raise BadInputError(f"method '{cfg.method}' needs a teacher")
    if data.num_labelled == 0 and (not distilling or logit_method is None):
        raise BadInputError(f"method '{cfg.method}' needs labelled training data ('y'): without labels only a "
                            "logit loss (kd, dkd, dist, ofa) trains the student's outputs")

    # ---- probe: output compatibility, label range, layer matching
    probe_n = fixed_batch or min(PROBE_SAMPLES, len(data))
    probe_inputs = _take(data.inputs, np.arange(probe_n) % len(data))
    student.to(device)
    student.eval()
    try:
        with torch.no_grad():
            if logits_name:
                _, feats = student.run_with_features(*_tensors(probe_inputs, input_names, device),
                                                     capture=[logits_name])
                s_logits = feats[logits_name]
            else:
                out = student(*_tensors(probe_inputs, input_names, device))
                s_logits = out[0] if isinstance(out, tuple) else out
    except (RuntimeError, ValueError, KeyError) as exc:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in probe_inputs.items())
        raise BadInputError(f"{what} cannot run on the training data ({shapes}): {str(exc).splitlines()[0][:300]}"
                            ) from None
    s_shape = tuple(s_logits.shape)
    if len(s_shape) < 2 or s_shape[0] != probe_n:
        raise BadInputError(f"{what} output has shape {list(s_shape)}; distillation needs [batch, classes] scores")
    num_classes = int(np.prod(s_shape[1:]))
    if data.labels is not None and int(data.labels.max()) >= num_classes:
        raise BadInputError(f"training labels go up to {int(data.labels.max())} but {what} scores "
                            f"{num_classes} classes")
    pairs: list[StagePair] = []
    ofa_stages: list[tuple[str, int]] = []
    if distilling:
        t_logits, _ = teacher.run(probe_inputs, [])
        t_shape = tuple(t_logits.shape)
        if t_shape[0] != probe_n or int(np.prod(t_shape[1:])) != num_classes:
            raise BadInputError(f"teacher and {what} outputs are incompatible: teacher scores have shape "
                                f"{list(t_shape)}, {what} scores {list(s_shape)} (on {probe_n} samples); "
                                "distillation needs the same classes")
    if features or logit_method == "ofa":
        s_values = probe_values(student, _tensors(probe_inputs, input_names, device))
        if features:
            pairs = match_by_resolution(s_values, teacher.probe(probe_inputs), batch=probe_n,
                                        max_pairs=cfg.max_pairs)
            if not pairs:
                raise BadInputError(f"method '{cfg.method}': teacher and {what} share no feature-map resolution "
                                    "to pair layers by; use a logit method (kd, dkd, dist, ofa)")
        if logit_method == "ofa":
            found = stages(s_values, batch=probe_n)
            deepest = sorted(found, key=lambda r: r[0] * r[1])[:cfg.max_pairs]
            ofa_stages = [(found[r].last, found[r].last_channels) for r in deepest]

    module = _TrainModule(student, logits_name, pairs, features, ofa_stages, num_classes).to(device)
    train_module: nn.Module = module
    if world > 1:
        train_module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, cfg)
    per_rank = len(data) // world
    steps_per_epoch = max(1, math.ceil(per_rank / cfg.batch_size))
    if cfg.min_steps > cfg.epochs * steps_per_epoch:
        cfg = dataclasses.replace(cfg, epochs=math.ceil(cfg.min_steps / steps_per_epoch))
    scheduler = _scheduler(optimizer, cfg, steps_per_epoch)

    t_out = None
    if distilling:
        per_sample = num_classes + sum(p.resolution[0] * p.resolution[1] * (p.teacher.last_channels + (
            p.teacher.first_channels if "fsp" in features else 0)) for p in pairs)
        est = len(data) * per_sample * 4
        t_out = _TeacherOutputs(teacher, pairs, features, data, cached=cfg.augment is None and est < CACHE_LIMIT_BYTES,
                                fixed=fixed_batch)

    reference = None
    teacher_metric = None
    if eval_data is not None and teacher is not None:
        ev_logits = np.concatenate([teacher.run(_take(eval_data.inputs, index), [])[0].reshape(len(index), -1)[:new]
                                    for index, new in chunks(len(eval_data), 256, fixed_batch)])
        reference = ev_logits.argmax(1)
        if eval_data.labels is not None:
            mask = eval_data.labels >= 0
            teacher_metric = float((reference[mask] == eval_data.labels[mask]).mean())
    if eval_data is not None and eval_data.labels is None and reference is None:
        eval_data = None  # nothing to measure against
    metric_name = None if eval_data is None else ("accuracy" if eval_data.labels is not None else "teacher_agreement")

    # ---- resume
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    start_epoch, history, best_metric, best_epoch, best_state = 0, [], None, None, None
    resumed_from = None
    if ckpt_dir is not None and cfg.resume and (ckpt_dir / "last.pt").is_file():
        state = torch.load(ckpt_dir / "last.pt", map_location=device, weights_only=False)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        best_metric, best_epoch, best_state = state["best_metric"], state["best_epoch"], state["best_state"]
        resumed_from = state["epoch"]
    initial_metric = None
    if eval_data is not None and start_epoch == 0:
        initial_metric = _metric(module, eval_data, input_names, device, reference, fixed=fixed_batch)
        best_metric, best_epoch, best_state = initial_metric, 0, copy.deepcopy(module.state_dict())

    rng = np.random.default_rng(cfg.seed + 7919 * start_epoch)
    show = not cfg.quiet and rank == 0
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=f"distill {cfg.method}", leave=False)
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        train_module.train()
        order = np.random.default_rng(cfg.seed * 100003 + epoch).permutation(len(data))
        order = order[rank::world][:per_rank] if world > 1 else order
        sums: dict[str, float] = {}
        steps = 0
        for index, _new in chunks(len(order), cfg.batch_size, fixed_batch):
            index = np.sort(order[index])
            inputs = _take(data.inputs, index)
            if cfg.augment is not None:
                inputs = cfg.augment(inputs, rng)
            labels = None if data.labels is None else torch.from_numpy(data.labels[index]).to(device)
            t_logits_t, t_feats_t = None, {}
            if t_out is not None:
                t_np, tf_np = t_out.get(index, inputs)
                t_logits_t = torch.from_numpy(t_np).to(device)
                t_feats_t = {k: torch.from_numpy(v).to(device) for k, v in tf_np.items()}
            out = train_module(*_tensors(inputs, input_names, device))
            loss, parts = _loss(out, t_logits_t, t_feats_t, labels, cfg, logit_method, features, len(pairs),
                                len(ofa_stages))
            if not torch.isfinite(loss):
                _diverged(module, best_state, best_metric, best_epoch, ckpt_dir, rank, epoch, steps, what)
            if not loss.requires_grad:  # a batch with nothing to learn from (no labels, no teacher term)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            steps += 1
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        if world > 1:
            _average_buffers(module, world)
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  **{k: v / max(1, steps) for k, v in sums.items()}}
        if eval_data is not None:
            metric = _metric(module, eval_data, input_names, device, reference, fixed=fixed_batch)
            record[metric_name or "metric"] = metric
            if best_metric is None or metric > best_metric:
                best_metric, best_epoch, best_state = metric, epoch + 1, copy.deepcopy(module.state_dict())
                if ckpt_dir is not None and rank == 0:
                    _save(ckpt_dir / "best.pt", {"module": best_state, "epoch": epoch + 1, "metric": metric})
        history.append(record)
        if ckpt_dir is not None and rank == 0:
            _save(ckpt_dir / "last.pt", {"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                                         "best_metric": best_metric, "best_epoch": best_epoch,
                                         "best_state": best_state, "method": cfg.method})
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", metric_name)})
        if (cfg.patience and best_epoch is not None and eval_data is not None
                and epoch + 1 - best_epoch >= cfg.patience):
            stopped_early = epoch + 1 < cfg.epochs
            break
    if bar is not None:
        bar.close()
    if train_module is not module:
        # Free the DDP wrapper now: its reducer holds autograd hooks and the process group, and left to the cyclic
        # collector it may only be freed at interpreter exit, when gloo's threads can no longer shut down cleanly.
        del train_module
        gc.collect()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return TrainResult(cfg.method, history, best_epoch, best_metric, metric_name, initial_metric, teacher_metric,
                       epoch + 1, stopped_early, [p.to_dict() for p in pairs], data.describe(), resumed_from,
                       cfg.batch_size)


def _average_buffers(module: nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over the ranks (DDP all-reduces gradients, not buffers), so that every
    rank ends with the same model."""
    import torch.distributed as dist

    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def _save(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a temporary file and a rename, so a checkpoint is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _diverged(module: _TrainModule, best_state: dict[str, Any] | None, best_metric: float | None,
              best_epoch: int | None, ckpt_dir: Path | None, rank: int, epoch: int, step: int, what: str) -> None:
    where = ""
    if best_state is not None:
        module.load_state_dict(best_state)
        if ckpt_dir is not None and rank == 0:
            _save(ckpt_dir / "best.pt", {"module": best_state, "epoch": best_epoch, "metric": best_metric})
            where = f"; best weights (epoch {best_epoch}, metric {best_metric:.4f}) kept in {ckpt_dir / 'best.pt'}"
        else:
            where = f"; best weights so far (epoch {best_epoch}) restored"
    raise TrainingDivergedError("distill", f"the loss of {what} became NaN/Inf at epoch {epoch + 1}, step {step + 1} "
                                f"(try a lower lr, or clip_grad_norm){where}")
