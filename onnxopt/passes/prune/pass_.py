"""The ``prune`` pass: structured channel pruning of an ONNX graph (whole filters and all that depends on them).

Dependency groups come from :mod:`.depgraph`, importance from :mod:`.criteria` (or :mod:`.taylor`), the per-group
cut from :mod:`.allocate`, the channel ratio for a MACs or measured-latency target from :mod:`.targets`, and the
rewrite from :mod:`.apply`. The pass is lossy: accuracy is recovered by the ``distill`` pass that follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import BadInputError, DataError, RecipeError
from onnxopt.irutil import adopt
from onnxopt.modelio import input_specs, to_proto
from onnxopt.passes.prune import allocate as alloc
from onnxopt.passes.prune.apply import apply_plan, round_selections
from onnxopt.passes.prune.criteria import CRITERIA, weight_scores
from onnxopt.passes.prune.depgraph import DepGraph, analyze, lift_constants
from onnxopt.passes.prune.targets import macs, search_latency, search_macs
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.registry import register


@register
@dataclass
class PrunePass(OnnxoptPass):
    """Structured channel pruning with ONNX dependency groups; one target of ratio / macs_ratio / latency_ratio.

    Parameters:
        ratio: fraction of the prunable channels removed (0 <= ratio < 1).
        macs_ratio: fraction of the model's MACs removed (0.5 = 2x fewer MACs). Default when no target is given.
        latency_ratio: fraction of the measured ORT latency (batch 1) removed; candidates are timed round-robin.
        criterion: l1, l2, bn_scale (needs BatchNormalization: normalize with fold_batchnorm=false) or taylor
            (needs calibration data; gradients through the torch bridge).
        allocation: global (one threshold over normalized scores) or uniform (the same fraction in every group).
        round_to: kept channel counts rounded to a multiple of this; auto (default): the channel block of ORT's CPU
            conv kernels on this host (16 with AVX-512, else 8; see ``hostinfo.channel_block``). On the digits
            MobileNetV2, odd counts made a 10%-pruned model 2.4x slower than the original, and counts rounded to 8
            instead of 16 made a 89%-pruned one 1.5x slower on an AVX-512 host; 1 = off.
        min_keep: channels every group keeps at least.
        protect: node names whose weights and channels are left whole.
        max_ratio: the largest channel ratio a target search tries.
        latency_measurements: candidate models timed at most by the latency search.
        taylor_samples: calibration samples for the taylor criterion (and for mean replacement).
        depth: fraction of the removable blocks (residual branches, stride-1 units and layers whose output has
            their input's shape; see :mod:`.blocks`) removed before the channel cut, least important first
            (importance: how far the outputs move when the block alone is removed, on calibration data or seeded
            random inputs). Depth cuts remove per-node overhead that channel cuts keep, which is most of the batch-1
            latency of small nets. A MACs target counts the removed blocks; a ratio target applies to the
            remaining channels.
        compensate: with calibration data, add the removed channels' mean contribution to the bias of the next
            Conv/Gemm (mean replacement; see :mod:`.means`). Off by default: on the digits MobileNetV2 it helped one
            group (50% of a 384-wide expansion: 92.75% -> 97.25%) and hurt another (96-wide: 52.5% -> 23.75%).
    """

    name: ClassVar[str] = "prune"
    exact: ClassVar[bool] = False

    ratio: float | None = None
    macs_ratio: float | None = None
    latency_ratio: float | None = None
    criterion: str = "l1"
    allocation: str = "global"
    round_to: int | Literal["auto"] = "auto"
    min_keep: int = 1
    protect: list[str] = field(default_factory=list)
    max_ratio: float = 0.9
    latency_measurements: int = 6
    taylor_samples: int = 128
    compensate: bool = False
    depth: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        targets = [t for t in (self.ratio, self.macs_ratio, self.latency_ratio) if t is not None]
        if len(targets) > 1:
            raise ValueError("give one of ratio, macs_ratio, latency_ratio")
        if not targets:
            self.macs_ratio = 0.5
        for label, value in (("ratio", self.ratio), ("macs_ratio", self.macs_ratio),
                             ("latency_ratio", self.latency_ratio)):
            if value is not None and not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{label} is the fraction removed, in [0, 1); got {value}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.allocation not in alloc.ALLOCATIONS:
            raise ValueError(f"allocation must be global or uniform, got {self.allocation!r}")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be auto or an integer >= 1, got {self.round_to!r}")
        if self.min_keep < 1:
            raise ValueError("min_keep must be >= 1")
        if not 0.0 <= float(self.depth) <= 1.0:
            raise ValueError(f"depth is the fraction of removable blocks removed, in [0, 1]; got {self.depth}")
        if not 0.0 < self.max_ratio < 1.0:
            raise ValueError(f"max_ratio must be in (0, 1), got {self.max_ratio}")

    def _round_to(self) -> int:
        if self.round_to != "auto":
            return int(self.round_to)
        from onnxopt.hostinfo import channel_block, host_info

        block = channel_block(host_info())
        self.details["round_to"] = block
        self.note(f"round_to auto: kept channel counts rounded to multiples of {block} (ORT's conv channel block "
                  "on this CPU)")
        return block

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        target = self.ratio if self.ratio is not None else self.macs_ratio if self.macs_ratio is not None \
            else self.latency_ratio
        if self.criterion == "taylor" and self.context.calib is None:
            raise DataError("prune criterion taylor needs calibration data (--calib): its importance is gradients "
                            "of the loss on real inputs")
        proto = lift_constants(to_proto(model))
        unknown = sorted(set(self.protect) - {n.name for n in proto.graph.node})
        if unknown:
            raise RecipeError(f"prune.protect names node(s) not in the model: {', '.join(unknown)}")
        shapes = {k: tuple(v) for k, v in self.context.input_shapes.items()}
        base_macs = macs(proto, shapes)
        original = proto
        proto, removed_blocks = self._remove_blocks(proto, shapes)
        graph = analyze(proto, set(self.protect))
        self._describe(graph)
        if not graph.prunable and not removed_blocks:
            self.note("nothing prunable: every channel group is blocked (see details['blocked']); model unchanged")
            return ir.passes.PassResult(model, modified=False)
        if not target and not removed_blocks:
            self.note("target 0: model unchanged")
            return ir.passes.PassResult(model, modified=False)
        if not graph.prunable or not target or (
                self.macs_ratio is not None and base_macs > 0
                and 1.0 - macs(proto, shapes) / base_macs >= self.macs_ratio):
            self._finish_depth_only(model, proto, shapes, base_macs)
            return ir.passes.PassResult(model, modified=True)
        scores = self._scores(proto, graph)

        means = self._means(proto, graph)
        round_to = self._round_to()

        def plan(r: float) -> dict[int, np.ndarray]:
            return round_selections(graph, alloc.allocate(scores, r, self.allocation, round_to, self.min_keep),
                                    scores, round_to)

        def build(r: float) -> onnx.ModelProto:
            return apply_plan(proto, graph, plan(r), means)

        if self.ratio is not None:
            ratio, pruned = self.ratio, build(self.ratio)
        elif self.macs_ratio is not None:
            if base_macs <= 0:
                raise BadInputError("prune macs_ratio: the model's MACs cannot be counted (dynamic shapes? give "
                                    "--input-shape)")
            found = search_macs(build, base_macs, self.macs_ratio, shapes, self.max_ratio)
            ratio, pruned = found.ratio, found.model
            self.details["search"] = found.trials
            if not found.met:
                self.note(f"macs_ratio {self.macs_ratio:.2f} cannot be met: the largest cut (channel ratio "
                          f"{self.max_ratio:.2f}) removes {found.achieved:.1%} of the MACs; returning that model")
        else:
            assert self.latency_ratio is not None
            start = search_macs(build, base_macs, self.latency_ratio, shapes, self.max_ratio, steps=6).ratio \
                if base_macs > 0 else self.latency_ratio
            found = search_latency(build, original, self.latency_ratio, start, self.max_ratio, self.context.threads,
                                   shapes, self.latency_measurements)
            ratio, pruned = found.ratio, found.model
            self.details["search"] = found.trials
            self.details["latency_removed"] = round(found.achieved, 4)
            if not found.met:
                self.note(f"latency_ratio {self.latency_ratio:.2f} not met in {len(found.trials)} measurements: "
                          f"best candidate removes {found.achieved:.1%} of the latency; returning it")
        removed = plan(ratio)
        after_macs = macs(pruned, shapes)
        kept = {g.id: g.size - removed[g.id].size for g in graph.prunable}
        self.details.update(
            criterion=self.criterion, allocation=self.allocation, channel_ratio=round(float(ratio), 4),
            channels_removed=round(alloc.removed_fraction(scores, removed), 4),
            macs_before=base_macs, macs_after=after_macs,
            kept_channels={", ".join(graph.groups[g].producers[:3]): f"{k}/{graph.groups[g].size}"
                           for g, k in kept.items()},
        )
        self.note(f"pruned {sum(r.size for r in removed.values())} of {sum(s.size for s in scores.values())} "
                  f"prunable channels ({self.criterion}, {self.allocation}); MACs {base_macs:,} -> {after_macs:,}")
        adopt(model, ir.serde.deserialize_model(pruned))
        return ir.passes.PassResult(model, modified=True)

    def _remove_blocks(self, proto: onnx.ModelProto,
                       shapes: dict[str, tuple[int, ...]]) -> tuple[onnx.ModelProto, list[str]]:
        """Depth cut: the ``depth`` fraction of removable blocks, least important first; ``proto`` when 0."""
        if not self.depth:
            return proto, []
        from onnxopt.passes.prune.blocks import block_scores, find_blocks, remove_blocks, select, value_shapes

        protected = set(self.protect)
        blocks = [b for b in find_blocks(proto, value_shapes(proto, shapes))
                  if not any(proto.graph.node[j].name in protected for j in b.nodes)]
        count = int(round(self.depth * len(blocks)))
        self.details["blocks_found"] = len(blocks)
        if not blocks or count == 0:
            self.note(f"depth {self.depth}: {len(blocks)} removable block(s) found, none removed")
            return proto, []
        specs = input_specs(ir.serde.deserialize_model(proto))
        scores = block_scores(proto, blocks, self.context.calib, specs, self.taylor_samples, self.context.threads,
                              self.context.seed, shapes)
        chosen = select(blocks, scores, count)
        by_block = dict(zip(blocks, scores))
        self.details["blocks_removed"] = [{"block": b.describe(), "score": round(by_block[b], 6)} for b in chosen]
        source = "calibration data" if self.context.calib is not None else "seeded random inputs"
        self.note(f"depth {self.depth}: removed {len(chosen)} of {len(blocks)} removable blocks (least output "
                  f"change on {source} first), e.g. " + "; ".join(b.describe() for b in chosen[:2]))
        return remove_blocks(proto, chosen), [b.describe() for b in chosen]

    def _finish_depth_only(self, model: ir.Model, proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                           base_macs: int) -> None:
        """Write the block-pruned model when no channel cut follows (target met, 0, or nothing prunable)."""
        after = macs(proto, shapes)
        self.details.update(criterion=self.criterion, channel_ratio=0.0, macs_before=base_macs, macs_after=after)
        if self.macs_ratio is not None and base_macs > 0:
            self.note(f"macs_ratio {self.macs_ratio:.2f} met by the depth cut alone: MACs {base_macs:,} -> {after:,}")
        elif self.latency_ratio is not None:
            self.note("latency_ratio: no channel group left to cut after the depth cut; the latency was not searched")
        adopt(model, ir.serde.deserialize_model(proto))

    def _means(self, proto: onnx.ModelProto, graph: DepGraph) -> dict[str, np.ndarray] | None:
        if not self.compensate or self.context.calib is None:
            return None
        from onnxopt.passes.prune.means import consumer_inputs, input_means

        specs = input_specs(ir.serde.deserialize_model(proto))
        means = input_means(proto, consumer_inputs(proto, graph), self.context.calib, specs, self.taylor_samples,
                            self.context.threads)
        self.note(f"mean replacement: biases of {len(means)} consumer layers absorb the removed channels' mean")
        return means

    def _scores(self, proto: onnx.ModelProto, graph: DepGraph) -> dict[int, np.ndarray]:
        if self.criterion == "taylor":
            from onnxopt.passes.prune.taylor import taylor_scores

            assert self.context.calib is not None
            specs = input_specs(ir.serde.deserialize_model(proto))
            return taylor_scores(proto, graph, self.context.calib, specs, self.taylor_samples, seed=self.context.seed)
        scores = weight_scores(proto, graph, self.criterion)
        if self.criterion == "bn_scale":
            without = [g for g in graph.prunable if not any(c.kind == "bn_scale" for c in g.cuts)]
            if without:
                self.note(f"bn_scale: {len(without)} group(s) have no BatchNormalization; scored by L1 instead")
        return scores

    def _describe(self, graph: DepGraph) -> None:
        blocked = graph.blocked_report()
        self.details.update(groups=len(graph.groups), prunable_groups=len(graph.prunable), blocked=blocked)
        if blocked:
            self.note(f"{len(blocked)} of {len(graph.groups)} channel groups left whole, e.g. "
                      + "; ".join(f"{', '.join(b['producers'][:2])}: {b['reasons'][0]}"  # type: ignore[index]
                                  for b in blocked[:3]))
