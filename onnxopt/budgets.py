"""Budgets a run must meet (``--budget accuracy_drop=0.01``) and their verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from onnxopt.errors import BadInputError

# name -> (direction, what it measures). "max": measured must be <= limit; "min": >= limit.
BUDGET_KINDS: dict[str, tuple[Literal["max", "min"], str]] = {
    "accuracy_drop": ("max", "original accuracy minus final accuracy (fraction, 0.01 = 1 point)"),
    "latency_ratio": ("max", "final / original median ORT latency at batch 1"),
    "size_ratio": ("max", "final / original file size"),
    "size_mb": ("max", "final file size in MB (10^6 bytes)"),
    "macs_ratio": ("max", "final / original multiply-accumulates"),
    "params_ratio": ("max", "final / original parameter count"),
    "min_sqnr_db": ("min", "SQNR of the final outputs against the original's, in dB"),
    "min_top1_agreement": ("min", "fraction of samples whose top-1 class matches the original's"),
}


@dataclass(frozen=True)
class Budget:
    name: str
    limit: float

    @property
    def direction(self) -> Literal["max", "min"]:
        return BUDGET_KINDS[self.name][0]


@dataclass
class BudgetVerdict:
    name: str
    limit: float
    direction: str
    measured: float | None
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        sign = "<=" if self.direction == "max" else ">="
        shown = "n/a" if self.measured is None else f"{self.measured:.4g}"
        status = "met" if self.passed else "MISSED"
        note = f" ({self.note})" if self.note else ""
        return f"{self.name}: {shown} {sign} {self.limit:g} -> {status}{note}"


def parse_budget(text: str) -> Budget:
    """Parse ``name=value``; unknown names and non-numbers are bad input."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep:
        raise BadInputError(f"budget '{text}' must look like NAME=VALUE, e.g. accuracy_drop=0.01")
    if name not in BUDGET_KINDS:
        raise BadInputError(f"unknown budget '{name}' (known: {', '.join(BUDGET_KINDS)})")
    try:
        limit = float(value)
    except ValueError:
        raise BadInputError(f"budget '{name}' needs a number, got '{value}'") from None
    if limit != limit or limit in (float("inf"), float("-inf")):
        raise BadInputError(f"budget '{name}' must be finite, got '{value}'")
    if name != "min_sqnr_db" and limit < 0:
        raise BadInputError(f"budget '{name}' must be >= 0, got {limit:g}")
    return Budget(name, limit)


def parse_budgets(items: "list[str] | dict[str, float] | None") -> list[Budget]:
    if not items:
        return []
    if isinstance(items, dict):
        return [parse_budget(f"{k}={v}") for k, v in items.items()]
    return [parse_budget(item) for item in items]


def judge(budget: Budget, measured: float | None, note: str = "") -> BudgetVerdict:
    if measured is None:
        return BudgetVerdict(budget.name, budget.limit, budget.direction, None, False, note or "could not be measured")
    ok = measured <= budget.limit + 1e-12 if budget.direction == "max" else measured >= budget.limit - 1e-12
    return BudgetVerdict(budget.name, budget.limit, budget.direction, measured, ok, note)
