"""Structured pruning: remove whole attention heads, FFN neurons and conv channels, so the dense kernels that remain
are smaller (and faster), not just full of zeros. transformers 5 removed `prune_heads`; this replaces it.

Units come from `compress.units.find_units`; they are scored (`gradient_scores`: first-order Taylor, or
`magnitude_scores`), the lowest-scoring share is removed in place (`prune_units_`), and `mask_units_` silences
units without removing them (the reference that removal must reproduce exactly). Grouped-query attention: query heads
are removed so that every kept KV head serves the same number of them; a KV head goes with all its query heads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from compress.units import Kind, Slice, UnitGroup


@dataclass
class Pruned:
    """What one `prune_units_` call removed."""

    groups: list[dict[str, Any]] = field(default_factory=list)  # kind, where, before, after, kept (indices)

    def count(self, kind: Kind) -> tuple[int, int]:
        """(units before, units after) of a kind, over all groups."""
        rows = [g for g in self.groups if g["kind"] == kind]
        return sum(g["before"] for g in rows), sum(g["after"] for g in rows)


# --- scoring ------------------------------------------------------------------------------------------------------

def _scored(group: UnitGroup) -> list[Slice]:
    return [s for s in group.slices if isinstance(s.tensor, nn.Parameter)]


def magnitude_scores(groups: list[UnitGroup]) -> list[torch.Tensor]:
    """Sum of |w| over each unit's weights (grouped-query heads: query heads, then KV heads)."""
    return [_unit_sums(g, lambda s: s.tensor.detach().abs()) for g in groups]


def gradient_scores(model: nn.Module, groups: list[UnitGroup], batches: Iterable[dict[str, torch.Tensor]],
                    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None
                    ) -> list[torch.Tensor]:
    """First-order (Taylor) estimate of the loss change from removing each unit: |sum over its weights of
    w * dL/dw| per batch, averaged over `batches`. A unit that does not reach the loss scores 0."""
    was_training = model.training
    model.eval()  # no dropout: the scores describe the model as it predicts
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    totals = [torch.zeros(g.units + (g.kv.units if g.kv else 0)) for g in groups]
    count = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            loss.backward()
            for total, group in zip(totals, groups, strict=True):
                total += _unit_sums(group, lambda s: s.tensor.detach() * s.tensor.grad).abs().cpu()
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if not count:
        raise ValueError("gradient importance needs at least one batch")
    return [t / count for t in totals]


def _unit_sums(group: UnitGroup, values: Callable[[Slice], torch.Tensor]) -> torch.Tensor:
    """Per-unit sums of `values` over the unit's weights; grouped-query heads: the query heads' sums, then the KV
    heads' (a KV head is removed only with all the query heads it serves)."""
    total = sum(s.per_unit(values(s), group.units) for s in _scored(group))
    if group.kv is not None:
        total = torch.cat([total, sum(s.per_unit(values(s), group.kv.units) for s in _scored(group.kv))])
    return total.float()


# --- choosing and removing ----------------------------------------------------------------------------------------

def prune_units_(groups: list[UnitGroup], scores: list[torch.Tensor], fractions: dict[Kind, float], *,
                 scope: Literal["layer", "global"] = "layer") -> Pruned:
    """Remove the lowest-scoring `fractions[kind]` of each kind's units, in place: the same share of every group
    (`layer`: uniform shapes), or one ranking over all groups of a kind, each group's scores divided by their L2 norm
    (`global`). Every group keeps at least one unit. `scores[i]` scores group i's units (grouped-query heads: the
    query heads', then the KV heads'), as `gradient_scores` and `magnitude_scores` return them."""
    keep_counts = [g.units for g in groups]
    for kind, fraction in fractions.items():
        members = [i for i, g in enumerate(groups) if g.kind == kind]
        if not fraction or not members:
            continue
        if scope == "layer":
            for i in members:
                keep_counts[i] = max(1, groups[i].units - round(groups[i].units * fraction))
        else:
            own = [scores[i][:groups[i].units] for i in members]  # query heads only: KV heads follow their queries
            for i, kept in _global_keep(members, own, fraction).items():
                keep_counts[i] = kept
    # Grouped-query heads: one (KV heads, queries per KV head) split for all layers with scope "layer", so that the
    # shapes stay uniform (the config describes them, the KV cache has one layout); per layer otherwise.
    options = {i: _grouped_options(scores[i], keep_counts[i], g.units) for i, g in enumerate(groups)
               if g.kv is not None and keep_counts[i] < g.units}
    common = _best_split(list(options.values())) if options and scope == "layer" else None
    report = Pruned()
    for i, (group, score, keep) in enumerate(zip(groups, scores, keep_counts, strict=True)):
        if keep == group.units:
            continue
        if group.kv is not None:
            kept_heads, kept_kv = options[i][common or _best_split([options[i]])][1]
            for s in group.kv.slices:
                s.keep_(group.kv.units, kept_kv)
        else:
            kept_heads = score.argsort(descending=True)[:keep].sort().values
        for s in group.slices:
            s.keep_(group.units, kept_heads)
        for owner in {id(s.owner): s.owner for s in group.slices + (group.kv.slices if group.kv else [])}.values():
            _sync_sizes(owner)
        before = group.units
        group.units = len(kept_heads)
        if group.kv is not None:
            group.kv.units = len(kept_kv)
        if group.on_resize:
            group.on_resize(group.units, group.kv.units if group.kv else group.units)
        report.groups.append({"kind": group.kind, "where": group.where, "before": before, "after": group.units,
                              "kept": kept_heads.tolist()})
    return report


def _global_keep(members: list[int], scores: list[torch.Tensor], fraction: float) -> dict[int, int]:
    """Units each group keeps under one ranking of all units (scores divided by their group's L2 norm, so layers
    with larger gradients do not dominate); every group keeps its best unit."""
    total = sum(len(s) for s in scores)
    budget = total - round(total * fraction) - len(members)
    kept = dict.fromkeys(members, 1)
    rest = []
    for i, score in zip(members, scores, strict=True):
        normed = score / score.norm().clamp_min(1e-12)
        rest += [(float(v), i) for v in normed.sort(descending=True).values[1:]]
    for _, i in sorted(rest, key=lambda r: -r[0])[:max(0, budget)]:
        kept[i] += 1
    return kept


def _grouped_options(scores: torch.Tensor, keep: int, num_heads: int) -> dict[tuple[int, int], tuple[float, Any]]:
    """Ways to keep at most `keep` query heads such that every kept KV head serves the same number of them:
    {(KV heads kept, queries per KV head): (score kept, (query heads, KV heads))}, the best heads for each split.
    `scores`: the query heads' then the KV heads'."""
    kv_heads = len(scores) - num_heads
    size = num_heads // kv_heads
    by_group = scores[:num_heads].reshape(kv_heads, size)
    options = {}
    for per_group in range(1, size + 1):
        top = by_group.topk(per_group, dim=1)
        group_totals = top.values.sum(dim=1) + scores[num_heads:]
        for groups_kept in range(1, min(kv_heads, keep // per_group) + 1):
            chosen = group_totals.topk(groups_kept).indices.sort().values
            heads = (chosen[:, None] * size + top.indices[chosen].sort(dim=1).values).reshape(-1)
            options[groups_kept, per_group] = (float(group_totals[chosen].sum()), (heads, chosen))
    return options


def _best_split(options: list[dict[tuple[int, int], tuple[float, Any]]]) -> tuple[int, int]:
    """The split available to all layers that keeps the most heads, then the most summed score."""
    common = set.intersection(*(set(o) for o in options))
    return max(common, key=lambda split: (split[0] * split[1], sum(o[split][0] for o in options)))


def _sync_sizes(module: nn.Module) -> None:
    """Set a layer's size attributes from its (sliced) weight, so its repr and any code reading them agree."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif type(module).__name__ == "Conv1D":
        module.nx, module.nf = weight.shape
    elif isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, nn.BatchNorm2d):
        module.num_features = weight.shape[0]


def mask_units_(groups: list[UnitGroup], masked: dict[int, list[int]]) -> None:
    """Silence units without removing them ({group index: unit indices}): zero the weights that read their output
    (the output projection's columns of a head, the next layer's inputs of a neuron or channel). Reference for tests
    and ablations: removing a masked unit must not change the output."""
    for index, units in masked.items():
        group = groups[index]
        for s in group.slices:
            if not _writes(s):
                s.tensor.detach().index_fill_(s.dim, s.positions(group.units, units), 0.0)


def _writes(s: Slice) -> bool:
    """Whether a slice produces the unit's output (True) or reads it (False: the next layer's inputs)."""
    conv1d = type(s.owner).__name__ == "Conv1D"
    if s.name != "weight" or isinstance(s.owner, nn.BatchNorm2d):
        return True
    return s.dim == (1 if conv1d else 0)
