"""Structured pruning: remove whole attention heads, FFN neurons and conv channels, so the dense kernels that remain
are smaller (and faster), not just full of zeros.

A model is described as unit groups: the heads of one attention layer, the neurons of one FFN, the output channels
of one conv. A group lists every tensor slice that belongs to each unit (a head's rows of q/k/v and its columns of
the output projection; a channel's conv filter, BatchNorm entries and the next layer's input slice), so scoring and
removal treat all of them together. Layouts covered: BERT-style encoders (BERT, MiniLM, RoBERTa), Llama-style
decoders (GQA: query heads are removed so every kept KV head serves the same number of them), GPT-2, tuneforge's
SimpleCNN and MLP, and transformers' ResNet (the channels inside each residual block; block outputs feed the
residual sums and stay). transformers 5 removed `prune_heads`; this replaces it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Kind = Literal["heads", "ffn", "channels"]
KINDS: tuple[Kind, ...] = ("heads", "ffn", "channels")


@dataclass
class Slice:
    """`owner.<name>` (a parameter or buffer) holds one slice per unit along `dim`, laid out as
    [blocks, units, width] (blocks: 3 for GPT-2's fused q|k|v projection, else 1)."""

    owner: nn.Module
    name: str
    dim: int
    blocks: int = 1

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.name)

    def per_unit(self, values: torch.Tensor, units: int) -> torch.Tensor:
        """Sum of `values` (shaped like the tensor) over each unit's slice: [units]."""
        moved = values.movedim(self.dim, 0)
        return moved.reshape(self.blocks, units, -1).sum(dim=(0, 2))

    def positions(self, units: int, unit_indices: list[int]) -> torch.Tensor:
        """Indices along `dim` of the given units' slices (in every block)."""
        width = self.tensor.shape[self.dim] // (self.blocks * units)
        grid = torch.arange(self.blocks * units * width).reshape(self.blocks, units, width)
        return grid[:, unit_indices].reshape(-1).to(self.tensor.device)

    def keep_(self, units: int, keep: torch.Tensor) -> None:
        """Replace the tensor by its slices of the units in `keep`."""
        old = self.tensor
        moved = old.detach().movedim(self.dim, 0)
        rest = moved.shape[1:]
        kept = moved.reshape(self.blocks, units, -1, *rest).index_select(1, keep.to(old.device))
        new = kept.reshape(-1, *rest).movedim(0, self.dim).contiguous()
        if isinstance(old, nn.Parameter):
            self.owner._parameters[self.name] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            self.owner._buffers[self.name] = new


@dataclass
class UnitGroup:
    """Interchangeable units at one place of a network (e.g. the 12 heads of layer 3)."""

    kind: Kind
    where: str  # module name, for reports
    units: int
    slices: list[Slice]
    kv: UnitGroup | None = None  # grouped-query attention: the KV heads; query head i uses KV head i // group size
    on_resize: Callable[[int, int], None] | None = None  # (units kept, kv heads kept): update the modules' counts

    @property
    def decoder_heads(self) -> bool:
        return self.kv is not None


@dataclass
class Pruned:
    """What one `prune_units_` call removed."""

    groups: list[dict[str, Any]] = field(default_factory=list)  # kind, where, before, after, kept (indices)

    def count(self, kind: Kind) -> tuple[int, int]:
        """(units before, units after) of a kind, over all groups."""
        rows = [g for g in self.groups if g["kind"] == kind]
        return sum(g["before"] for g in rows), sum(g["after"] for g in rows)


# --- finding the units ------------------------------------------------------------------------------------------

def find_units(model: nn.Module) -> list[UnitGroup]:
    """The unit groups of every layer this module knows how to prune, in network order."""
    groups: list[UnitGroup] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if _has(module, "attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"):
            groups += _bert_layer(name, module)
        elif _has(module, "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            groups += _llama_layer(name, module)
        elif _has(module, "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            groups += _gpt2_layer(name, module)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    if model_type == "tuneforge-simple-cnn":
        groups += _conv_chain("features", list(model.features), next_linear=_first(model.classifier, nn.Linear),
                              spatial=config.feature_size[0] * config.feature_size[1])
        groups += _linear_chain("classifier", model.classifier)
    elif model_type == "tuneforge-mlp":
        groups += _linear_chain("classifier", model.classifier)
    elif model_type == "resnet":
        for name, module in modules.items():
            if type(module).__name__ in ("ResNetBasicLayer", "ResNetBottleNeckLayer"):
                convs = [(c.convolution, c.normalization) for c in module.layer]
                groups += _conv_chain(f"{name}.layer", [m for pair in convs for m in pair], last_stays=True)
    return groups


def _has(module: nn.Module, *paths: str) -> bool:
    for path in paths:
        try:
            module.get_submodule(path)
        except AttributeError:
            return False
    return True


def _first(modules: Iterable[nn.Module], kind: type) -> nn.Module:
    return next(m for m in modules if isinstance(m, kind))


def _linear_slices(linear: nn.Module, *, out: bool, blocks: int = 1) -> list[Slice]:
    """A Linear's (or GPT-2 Conv1D's, whose weight is [in, out]) slices along its outputs or inputs."""
    conv1d = type(linear).__name__ == "Conv1D"
    weight_dim = (1 if conv1d else 0) if out else (0 if conv1d else 1)
    slices = [Slice(linear, "weight", weight_dim, blocks)]
    if out and linear.bias is not None:
        slices.append(Slice(linear, "bias", 0, blocks))
    return slices


def _bert_layer(name: str, layer: nn.Module) -> list[UnitGroup]:
    attn = layer.attention.self
    heads = UnitGroup("heads", f"{name}.attention", attn.num_attention_heads,
                      [*_linear_slices(attn.query, out=True), *_linear_slices(attn.key, out=True),
                       *_linear_slices(attn.value, out=True), *_linear_slices(layer.attention.output.dense, out=False)])

    def resize(kept: int, _: int) -> None:
        attn.num_attention_heads = kept
        attn.all_head_size = kept * attn.attention_head_size

    heads.on_resize = resize
    inner, outer = layer.intermediate.dense, layer.output.dense
    ffn = UnitGroup("ffn", f"{name}.intermediate", inner.out_features,
                    [*_linear_slices(inner, out=True), *_linear_slices(outer, out=False)])
    return [heads, ffn]


def _llama_layer(name: str, layer: nn.Module) -> list[UnitGroup]:
    attn, mlp = layer.self_attn, layer.mlp
    num_heads = attn.q_proj.out_features // attn.head_dim
    kv = UnitGroup("heads", f"{name}.self_attn (kv)", attn.k_proj.out_features // attn.head_dim,
                   [*_linear_slices(attn.k_proj, out=True), *_linear_slices(attn.v_proj, out=True)])
    heads = UnitGroup("heads", f"{name}.self_attn", num_heads,
                      [*_linear_slices(attn.q_proj, out=True), *_linear_slices(attn.o_proj, out=False)], kv=kv)

    def resize(kept: int, kv_kept: int) -> None:
        attn.num_key_value_groups = kept // kv_kept

    heads.on_resize = resize
    ffn = UnitGroup("ffn", f"{name}.mlp", mlp.down_proj.in_features,
                    [*_linear_slices(mlp.gate_proj, out=True), *_linear_slices(mlp.up_proj, out=True),
                     *_linear_slices(mlp.down_proj, out=False)],
                    on_resize=lambda kept, _: setattr(mlp, "intermediate_size", kept))
    return [heads, ffn]


def _gpt2_layer(name: str, layer: nn.Module) -> list[UnitGroup]:
    attn, mlp = layer.attn, layer.mlp
    heads = UnitGroup("heads", f"{name}.attn", attn.num_heads,
                      [*_linear_slices(attn.c_attn, out=True, blocks=3), *_linear_slices(attn.c_proj, out=False)])

    def resize(kept: int, _: int) -> None:
        attn.num_heads = kept
        attn.split_size = kept * attn.head_dim  # c_attn's output is split into q, k, v of this width

    heads.on_resize = resize
    ffn = UnitGroup("ffn", f"{name}.mlp", mlp.c_fc.nf,
                    [*_linear_slices(mlp.c_fc, out=True), *_linear_slices(mlp.c_proj, out=False)])
    return [heads, ffn]


def _conv_chain(prefix: str, modules: list[nn.Module], *, next_linear: nn.Module | None = None, spatial: int = 1,
                last_stays: bool = False) -> list[UnitGroup]:
    """The output channels of each Conv2d in a sequence (with the BatchNorm after it and the next conv's inputs);
    the last conv feeds `next_linear` through a flatten of `spatial` positions per channel, or stays (`last_stays`)."""
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    groups = []
    for n, i in enumerate(convs):
        last = n == len(convs) - 1
        if last and last_stays:
            break
        conv = modules[i]
        slices = [Slice(conv, "weight", 0)] + ([Slice(conv, "bias", 0)] if conv.bias is not None else [])
        norm = next((m for m in modules[i + 1:convs[n + 1] if not last else None] if isinstance(m, nn.BatchNorm2d)),
                    None)
        if norm is not None:
            slices += [Slice(norm, p, 0) for p in ("weight", "bias", "running_mean", "running_var")]
        if not last:
            slices.append(Slice(modules[convs[n + 1]], "weight", 1))
        else:  # flatten: channel c owns inputs [c * spatial, (c + 1) * spatial) of the linear layer
            if next_linear is None or next_linear.in_features != conv.out_channels * spatial:
                raise ValueError(f"{prefix}.{i}: the layer after the last conv does not read {spatial} inputs per "
                                 "channel")
            slices.append(Slice(next_linear, "weight", 1))
        groups.append(UnitGroup("channels", f"{prefix}.{i}", conv.out_channels, slices))
    return groups


def _linear_chain(prefix: str, modules: nn.Sequential) -> list[UnitGroup]:
    """The hidden units of a stack of Linear layers (all but the output layer)."""
    linears = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    return [UnitGroup("ffn", f"{prefix}.{i}", modules[i].out_features,
                      [*_linear_slices(modules[i], out=True), *_linear_slices(modules[j], out=False)])
            for i, j in itertools.pairwise(linears)]


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


# --- describing the result ----------------------------------------------------------------------------------------

def update_config_(model: nn.Module) -> None:
    """Write the pruned sizes into the model's config wherever its fields can describe them: SimpleCNN / MLP widths,
    uniform FFN widths (intermediate_size, GPT-2's n_inner), and for Llama-style configs (explicit head_dim)
    uniform query / KV head counts. What a config cannot describe is recorded by `finetune.shapes`."""
    config = model.config
    groups = find_units(model)
    if config.model_type == "tuneforge-simple-cnn":
        convs = iter(m.out_channels for m in model.features if isinstance(m, nn.Conv2d))
        config.conv_channels = [[next(convs) for _ in block] for block in config.conv_channels]
    if config.model_type in ("tuneforge-simple-cnn", "tuneforge-mlp"):
        config.hidden_sizes = [g.units for g in groups if g.kind == "ffn"]
        return
    ffn = {g.units for g in groups if g.kind == "ffn"}
    heads = {(g.units, g.kv.units) for g in groups if g.kind == "heads" and g.kv is not None}
    if len(ffn) == 1:
        if hasattr(config, "intermediate_size"):
            config.intermediate_size = ffn.pop()
        elif config.model_type == "gpt2":
            config.n_inner = ffn.pop()
    if len(heads) == 1 and getattr(config, "head_dim", None) and hasattr(config, "num_key_value_heads"):
        config.num_attention_heads, config.num_key_value_heads = heads.pop()


def attention_shape(model: nn.Module) -> tuple[int, int] | None:
    """(heads, heads x head size) of every attention layer when all layers agree (what ONNX Runtime's attention fusion
    needs to be told for a pruned model), None when they differ; (0, 0) for a model without attention layers."""
    shapes = set()
    for group in find_units(model):
        if group.kind == "heads":
            width = group.slices[0].tensor.shape[group.slices[0].dim] // group.slices[0].blocks
            shapes.add((group.units, width))
    if not shapes:
        return 0, 0
    return shapes.pop() if len(shapes) == 1 else None
