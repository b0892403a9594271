"""Distillation losses, logit-based and feature-based, for teachers and students of unrelated architectures.

Logit losses (KD, DKD, DIST, OFA) only need the two networks to agree on the classes, so they transfer across any
pair of architectures; that is why the pass defaults to one of them. Feature losses (FitNets hints, FSP, attention
transfer) need matched layers (:mod:`onnxopt.passes.distill.matching`) and small learned adapters where the channel
counts differ; published cross-architecture results (CRD's table: VGG13 -> MobileNetV2, FitNet and AT below the
undistilled student) are why they are opt-in and reported next to the no-teacher baseline.

Every function takes raw logits / feature maps and returns a scalar tensor averaged over the batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Logit-level methods and feature-level methods by name (``method`` in the pass; ``+`` combines them).
LOGIT_METHODS = ("kd", "dkd", "dist", "ofa")
FEATURE_METHODS = ("fitnet", "fsp", "at")
#: Default weight of each feature loss relative to the logit / cross-entropy terms.
FEATURE_WEIGHTS = {"fitnet": 1.0, "fsp": 1.0, "at": 100.0}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015: KL(softmax(t/T) || softmax(s/T)) * T^2 (the T^2 keeps gradients comparable across T)."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float = 4.0,
             alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): target-class KD (binary: target vs rest) weighted ``alpha`` plus
    non-target-class KD (the distribution over the other classes) weighted ``beta``; ``target`` is the label, or the
    teacher's top-1 where there is none."""
    mask = F.one_hot(target, student.shape[1]).to(student.dtype)
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    bin_s = torch.stack([(p_s * mask).sum(1), (p_s * (1 - mask)).sum(1)], dim=1).clamp_min(1e-12)
    bin_t = torch.stack([(p_t * mask).sum(1), (p_t * (1 - mask)).sum(1)], dim=1).clamp_min(1e-12)
    tckd = F.kl_div(bin_s.log(), bin_t, reduction="batchmean") * temperature**2
    if student.shape[1] < 3:  # one non-target class: its conditional distribution is always [1]
        return alpha * tckd
    log_q_s = F.log_softmax(student / temperature - 1000.0 * mask, dim=1)
    q_t = F.softmax(teacher / temperature - 1000.0 * mask, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * temperature**2
    return alpha * tckd + beta * nckd


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - Pearson correlation along dim 1, averaged over dim 0."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return (1 - corr).mean()


def dist_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, beta: float = 1.0,
              gamma: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al. 2022): match the *relations* of the predictions rather than their values: inter-class
    (per sample, across classes) and intra-class (per class, across the batch) Pearson correlation. Invariant to
    shift and scale of the teacher's scores, which makes it robust to much stronger teachers."""
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    inter = _pearson_distance(p_s, p_t)
    intra = _pearson_distance(p_s.t(), p_t.t()) if student.shape[0] > 1 else student.new_zeros(())
    return temperature**2 * (beta * inter + gamma * intra)


def ofa_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
             eps: float = 1.0) -> torch.Tensor:
    """OFA loss (Hao et al. 2023, One-for-All KD): cross-entropy with the teacher's distribution where the target
    class term is weighted by ``(1 + p_t[target])^eps``, which amplifies the target information; eps=1 is KD."""
    p_t = F.softmax(teacher / temperature, dim=1)
    log_p_s = F.log_softmax(student / temperature, dim=1)
    mask = F.one_hot(target, student.shape[1]).to(student.dtype)
    p_target = (p_t * mask).sum(1, keepdim=True)
    weights = mask * (1 + p_target).pow(eps) + (1 - mask) * p_t
    return -(weights * log_p_s).sum(1).mean() * temperature**2


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al. 2015): MSE between the adapted student map and the teacher map, relative to the
    teacher map's mean square so that one weight fits layers of any magnitude."""
    scale = teacher_feat.detach().pow(2).mean().clamp_min(1e-8)
    return F.mse_loss(student_feat, teacher_feat) / scale


def attention_map(feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Attention transfer map (Zagoruyko & Komodakis 2017): channel mean of |F|^p, flattened and L2-normalized;
    it has no channel dimension, so it compares networks of any widths."""
    return F.normalize(feat.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Squared distance between attention maps (resized to the teacher's resolution when they differ)."""
    if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear", align_corners=False)
    return (attention_map(student_feat) - attention_map(teacher_feat)).pow(2).mean()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure (Yim et al. 2017): G = F1^T F2 / (h w), a [N, C1, C2] Gram matrix between two maps
    of one resolution (the second is pooled to the first's size when they differ)."""
    if first.shape[-2:] != second.shape[-2:]:
        second = F.adaptive_avg_pool2d(second, first.shape[-2:])
    n, c1, h, w = first.shape
    return torch.bmm(first.reshape(n, c1, h * w), second.reshape(n, second.shape[1], h * w).transpose(1, 2)) / (h * w)


def fsp_loss(student_pair: tuple[torch.Tensor, torch.Tensor],
             teacher_pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Relative squared distance between the student's and the teacher's FSP matrices (the student's maps already
    adapted to the teacher's channel counts)."""
    g_s, g_t = fsp_matrix(*student_pair), fsp_matrix(*teacher_pair)
    return F.mse_loss(g_s, g_t) / g_t.detach().pow(2).mean().clamp_min(1e-8)


class Adapter(nn.Module):
    """A learned 1x1 convolution (+ BN) mapping student channels to teacher channels for hints and FSP; it only
    exists during training and is never written into the student's graph."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LogitProjector(nn.Module):
    """OFA-style branch: projects a student feature map into logit space (1x1 conv, BN, ReLU, global pool, linear),
    so that an intermediate stage of any architecture can be distilled against the teacher's logits."""

    def __init__(self, cin: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))
