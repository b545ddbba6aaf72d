"""Models whose layers have shapes their config cannot describe (e.g. pruned attention heads in a BERT, whose config
derives the head size as hidden_size / num_attention_heads, or a different head count in each layer).

The differences from the model that `config` builds are recorded in config.json under `tuneforge_shapes`:
parameter and buffer shapes, and the integer/float attributes of modules that changed with them (head counts,
`out_features`...). `from_pretrained` rebuilds those shapes before loading the safetensors weights, so such a model
saves and loads like any other. Models that need no record load with the plain `from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SHAPES_KEY = "tuneforge_shapes"
# from_pretrained arguments that are not config overrides; `from_pretrained` below passes the build ones on.
_LOADING_KWARGS = ("use_safetensors", "ignore_mismatched_sizes", "trust_remote_code", "attn_implementation", "dtype")


def shape_record(model: torch.nn.Module) -> dict[str, Any] | None:
    """How `model` differs from a fresh `type(model)(model.config)`: {"parameters": {name: shape}, "buffers":
    {name: shape}, "attributes": {module: {attr: value}}}; None when it does not."""
    config = copy.deepcopy(model.config)
    if hasattr(config, SHAPES_KEY):
        delattr(config, SHAPES_KEY)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        fresh = type(model)(config)
    record: dict[str, Any] = {"parameters": _shape_diff(dict(model.named_parameters()), dict(fresh.named_parameters())),
                              "buffers": _shape_diff(dict(model.named_buffers()), dict(fresh.named_buffers())),
                              "attributes": {}}
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        ref = vars(fresh_modules[name])
        changed = {k: v for k, v in vars(module).items() if not k.startswith("_") and type(v) in (int, float)
                   and ref.get(k) != v}
        if changed:
            record["attributes"][name] = changed
    return record if any(record.values()) else None


def record_shapes_(model: torch.nn.Module) -> dict[str, Any] | None:
    """Store `shape_record(model)` in `model.config` (saved with config.json), or drop a stale one; return it."""
    record = shape_record(model)
    if record is None:
        if hasattr(model.config, SHAPES_KEY):
            delattr(model.config, SHAPES_KEY)
    else:
        setattr(model.config, SHAPES_KEY, record)
    return record


def apply_shapes_(model: torch.nn.Module, record: dict[str, Any]) -> None:
    """Give a model built from its config the recorded shapes (uninitialised tensors: load weights next)."""
    for kind in ("parameters", "buffers"):
        for name, shape in record.get(kind, {}).items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            table = module._parameters if kind == "parameters" else module._buffers
            if table.get(attr) is None:
                raise ValueError(f"the recorded shapes name {kind[:-1]} {name!r}, which {type(model).__name__} lacks")
            old = table[attr]
            new = old.new_empty(shape)
            table[attr] = torch.nn.Parameter(new, requires_grad=old.requires_grad) if kind == "parameters" else new
    for module_name, attrs in record.get("attributes", {}).items():
        module = model.get_submodule(module_name)
        for attr, value in attrs.items():
            setattr(module, attr, value)


def from_pretrained(loader: Any, source: str | Path, **kwargs: Any) -> Any:
    """`loader.from_pretrained(source, **kwargs)`; for a folder whose config.json records reshaped layers: the config
    (with the config overrides in kwargs), the model built from it, the recorded shapes, then the safetensors weights.
    """
    config_file = Path(source) / "config.json"
    if not config_file.is_file() or SHAPES_KEY not in json.loads(config_file.read_text()):
        return loader.from_pretrained(source, **kwargs)
    from transformers import AutoConfig

    loading = {k: kwargs.pop(k) for k in _LOADING_KWARGS if k in kwargs}
    remote = loading.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(source, trust_remote_code=remote, **kwargs)
    build = {k: loading[k] for k in ("attn_implementation", "dtype") if k in loading}
    model = loader.from_config(config, trust_remote_code=remote, **build)
    apply_shapes_(model, getattr(config, SHAPES_KEY))
    _load_safetensors(model, Path(source), ignore_mismatched_sizes=loading.get("ignore_mismatched_sizes", False))
    return model.eval()


def _shape_diff(actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    if actual.keys() != reference.keys():
        extra = sorted(actual.keys() ^ reference.keys())[:3]
        raise ValueError(f"the model's layers differ from what its config builds beyond shapes (e.g. {extra}); "
                         "update the config's layer counts first")
    return {name: list(t.shape) for name, t in actual.items() if t.shape != reference[name].shape}


def _load_safetensors(model: torch.nn.Module, folder: Path, *, ignore_mismatched_sizes: bool) -> None:
    """Load model.safetensors (or its shards) strictly: every key present, right shape; tied copies may be absent."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    if not (folder / files[0]).is_file():
        raise OSError(f"{folder} has no model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    expected = model.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mismatched and ignore_mismatched_sizes:
        logger.warning("not loaded (shape differs, newly initialised): %s", ", ".join(mismatched))
        state = {k: v for k, v in state.items() if k not in mismatched}
    elif mismatched:
        k = mismatched[0]
        raise ValueError(f"{folder}: {k} has shape {list(state[k].shape)}, the rebuilt model expects "
                         f"{list(expected[k].shape)}; its config.json {SHAPES_KEY} does not match the weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{folder}: weights the model does not have: {', '.join(unexpected[:5])}")
    # A tied parameter (e.g. GPT-2's lm_head = wte) is saved once; its other name is missing but loaded.
    owners = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    by_name = {n: names for names in owners.values() for n in names}
    untied = [k for k in missing if k not in mismatched and not (set(by_name.get(k, [])) - set(missing))]
    if untied:
        raise ValueError(f"{folder}: weights missing from the checkpoint: {', '.join(untied[:5])}")
