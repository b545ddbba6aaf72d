"""Export PyTorch models to ONNX graphs with dynamic batch and sequence axes (torch.onnx.export, TorchScript).

Graphs (names are the manifest's; see serve.bundle.manifest for shapes):
  - classifiers: the model's own inputs (input_ids, attention_mask, token_type_ids where the model uses it;
    pixel_values) -> logits;
  - causal LMs: "model" (no cache: input_ids, attention_mask, position_ids -> logits) and "decoder", which takes and
    returns the KV cache as flat tensors (past_key_values.{i}.key/value -> present.{i}.key/value) so generation does
    not recompute the prefix. Prefill uses the decoder with an empty past; one graph serves both phases.

Every graph is traced from a wrapper that stays in eval mode. torch.onnx.export restores the training flag of the
module it was given after exporting; a wrapper built in train mode (nn.Module's default) would switch the wrapped
model back to train mode, so PyTorch references computed after the export ran with dropout. That, not the graph,
made a GPT-2 decoder differ by ~0.1 from "PyTorch" (Llama, with attention_dropout 0, looked fine).
The exporter is TorchScript (dynamo=False): it needs no onnxscript, and ONNX Runtime's transformer fusions are written
against its patterns.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import ExportError, require

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LM_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class Graph:
    """An exported graph and the eval-mode PyTorch module it was traced from (the reference for parity)."""

    role: str  # "model" or "decoder"
    path: Path
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]

    def reference(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """PyTorch outputs for numpy feeds, named as the graph's outputs."""
        if self.module.training:
            raise RuntimeError("the reference module is in train mode (dropout on); call .eval() first")
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names))
        out = out if isinstance(out, tuple) else (out,)
        return {name: t.float().numpy() for name, t in zip(self.output_names, out, strict=True)}


class _NamedForward(torch.nn.Module):
    """Calls a transformers model with keyword inputs given positionally (as export passes them); returns logits."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], **fixed: Any):
        super().__init__()
        self.model, self.input_names, self.fixed = model, list(input_names), fixed
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True)), **self.fixed).logits


class _DecoderWithPast(torch.nn.Module):
    """A causal LM step: named inputs, then the past as flat key, value tensors per layer -> logits, flat presents."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], num_layers: int):
        super().__init__()
        self.model, self.input_names, self.num_layers = model, list(input_names), num_layers
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        named = dict(zip(self.input_names, inputs[:len(self.input_names)], strict=True))
        past = inputs[len(self.input_names):]
        # Built from the config, so models with sliding-window layers get the right cache layer types.
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], config=self.model.config)
        out = self.model(**named, past_key_values=cache, use_cache=True)
        return (out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))


def forward_input_names(model: torch.nn.Module, candidates: Sequence[str], *,
                        tokenizer_inputs: Sequence[str] | None = None) -> list[str]:
    """The candidates that the model's forward accepts (and, for token_type_ids, that the tokenizer produces:
    RoBERTa-style models accept them but were never trained with them)."""
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in candidates if n in accepted]
    if tokenizer_inputs is not None and "token_type_ids" in names and "token_type_ids" not in tokenizer_inputs:
        names.remove("token_type_ids")
    return names


def cache_layout(model: torch.nn.Module) -> dict[str, Any]:
    """Layers, KV heads and head size of a causal LM's cache, read from one real forward (works for MHA and GQA)."""
    with torch.inference_mode():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    _, kv_heads, _, head_dim = layers[0].keys.shape
    return {"num_layers": len(layers), "num_kv_heads": int(kv_heads), "head_dim": int(head_dim), "dtype": "float32",
            "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
            "present_key": "present.{i}.key", "present_value": "present.{i}.value"}


def export_classifier(model: torch.nn.Module, path: Path, *, example: dict[str, np.ndarray], input_names: Sequence[str],
                      opset: int = DEFAULT_OPSET) -> Graph:
    """Text or image classifier (or regressor) -> logits [batch, labels]; text inputs get dynamic sequence axes."""
    axes = {n: {0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"} for n in input_names}
    module = _NamedForward(model, input_names)
    return _export(module, "model", path, example, list(input_names), ["logits"], {**axes, "logits": {0: "batch"}},
                   opset)


def export_causal_lm(model: torch.nn.Module, path: Path, *, example: dict[str, np.ndarray],
                     input_names: Sequence[str], opset: int = DEFAULT_OPSET) -> Graph:
    """The no-cache graph: logits [batch, sequence, vocab] for every position (scoring, perplexity)."""
    axes = {n: {0: "batch", 1: "sequence"} for n in [*input_names, "logits"]}
    module = _NamedForward(model, input_names, use_cache=False)
    return _export(module, "model", path, example, list(input_names), ["logits"], axes, opset)


def export_decoder(model: torch.nn.Module, path: Path, *, example: dict[str, np.ndarray], input_names: Sequence[str],
                   cache: dict[str, Any], opset: int = DEFAULT_OPSET) -> Graph:
    """The decoder with past key/values (see the module docstring); `example` must hold a non-empty past."""
    layers = range(cache["num_layers"])
    past = [cache[f"past_{kind}"].format(i=i) for i in layers for kind in ("key", "value")]
    present = [cache[f"present_{kind}"].format(i=i) for i in layers for kind in ("key", "value")]
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    axes["logits"] = {0: "batch", 1: "sequence"}
    module = _DecoderWithPast(model, input_names, cache["num_layers"])
    return _export(module, "decoder", path, example, [*input_names, *past], ["logits", *present], axes, opset)


def _export(module: torch.nn.Module, role: str, path: Path, example: dict[str, np.ndarray], input_names: list[str],
            output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> Graph:
    """Trace `module` on `example` and write the graph. The example must be padded (attention masks with zeros) and
    have batch >= 2 and sequence >= 2: tracing bakes Python branches in, and transformers skips the mask for
    all-ones masks and takes shortcuts for one-token queries."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n])) for n in input_names)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # TracerWarnings flag the Python branches named above; the parity gate checks what they would break.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        try:
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed for the {role} graph ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); try another opset") from err
    module.eval()  # export restores the flag it found; keep the reference dropout-free regardless
    logger.info("exported %s (opset %d)", path.name, opset)
    return Graph(role=role, path=path, module=module, input_names=input_names, output_names=output_names)


def describe_graph(path: Path) -> dict[str, Any]:
    """Opset, inputs and outputs ({name, dtype, shape}, symbolic dims as strings) of an ONNX file, and the count of
    exactly-zero values among its float weight matrices (initializers with 2+ dims): one load of the file."""
    onnx = require("onnx")
    model = onnx.load(str(path))

    def tensors(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    zeros = total = 0
    for init in model.graph.initializer:
        if len(init.dims) >= 2 and init.data_type == onnx.TensorProto.FLOAT:
            values = onnx.numpy_helper.to_array(init)
            zeros += int(values.size - np.count_nonzero(values))
            total += int(values.size)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output),
            "weight_zeros": zeros, "weight_count": total}
