"""The prunable units of a network: attention heads, FFN neurons, conv channels, each with every tensor slice it owns.

A model is described as unit groups: the heads of one attention layer, the neurons of one FFN, the output channels
of one conv. A group lists every tensor slice that belongs to each unit (a head's rows of q/k/v and its columns of
the output projection; a channel's conv filter, BatchNorm entries and the next layer's input slice), so scoring and
removal (compress.structured) treat all of them together. Layouts covered: BERT-style encoders (BERT, MiniLM,
RoBERTa), Llama-style decoders (grouped-query attention: the KV heads form a group of their own), GPT-2, tuneforge's
SimpleCNN and MLP, and transformers' ResNet (the channels inside each residual block; block outputs feed the
residual sums and stay).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

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
