"""The "optimized" variant: ONNX Runtime graph optimizations applied offline and saved, so sessions load fused graphs.

Two passes: onnxruntime.transformers' fusions (attention, embedding + LayerNorm, GELU) for the model families they
are written for, then ORT's own optimizer at ORT_ENABLE_EXTENDED. Not ORT_ENABLE_ALL: its layout transformations
depend on the CPU that saves the file (NCHWc block size follows the ISA), and a session applies them at load time.

Two fusions are left out on purpose (`SLOW_FUSIONS`), offline and at session load (`session_settings`), because they
make CPU inference slower (measured by bench/compression.py, onnxruntime 1.32, AVX-512 VNNI, one thread):
  - SkipLayerNormalization: its CPU kernel takes ~3.5x the time of Add + LayerNormalization on a [24, 384] MiniLM
    activation (~50 us vs ~14 us) and ~9x at batch 8; a 6-layer encoder has 12 of them.
  - BiasGelu: as fast as Add + Gelu in fp32, but it takes the bias Add away from the MatMul before it, so an int8
    graph cannot fold that bias into DynamicQuantizeMatMul (~45% more time in the GELU step at batch 8).
The result is parity-gated like any other variant.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from compress.errors import require

logger = logging.getLogger(__name__)

# transformers model_type -> onnxruntime.transformers.optimizer model_type whose fusions match its graph.
FUSIONS = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert",
           "camembert": "bert", "mpnet": "bert", "gpt2": "gpt2"}
ORT_LEVEL = "ORT_ENABLE_EXTENDED"
# Fused op -> (onnxruntime.transformers FusionOptions flags forming it, the ORT graph transformer forming it at load).
SLOW_FUSIONS = {
    "SkipLayerNormalization": (("enable_skip_layer_norm", "enable_bias_skip_layer_norm"), "SkipLayerNormFusion"),
    "BiasGelu": (("enable_bias_gelu",), "BiasGeluFusion"),
}
DEFAULT_SKIP_FUSIONS = tuple(SLOW_FUSIONS)


def session_settings(skip_fusions: tuple[str, ...] | list[str] = DEFAULT_SKIP_FUSIONS) -> dict[str, Any]:
    """The manifest's per-variant `session`: how an ONNX Runtime session should be created for the measured speed
    (ORT_ENABLE_ALL, with the transformers that would re-form the slow fusions at load disabled)."""
    unknown = sorted(set(skip_fusions) - set(SLOW_FUSIONS))
    if unknown:
        raise ValueError(f"cannot skip fusions {unknown}; known: {', '.join(SLOW_FUSIONS)}")
    return {"graph_optimization_level": "ORT_ENABLE_ALL",
            "disabled_optimizers": [SLOW_FUSIONS[op][1] for op in skip_fusions]}


def optimization_settings(model_type: str | None,
                          skip_fusions: tuple[str, ...] | list[str] = DEFAULT_SKIP_FUSIONS) -> dict[str, Any]:
    """The manifest's `optimization` entry (its per-graph statistics are added under "graphs")."""
    fusions = FUSIONS.get(model_type or "")
    return {"method": (f"onnxruntime.transformers fusions ({fusions}) + " if fusions else "") + ORT_LEVEL,
            "fusions": fusions, "ort_level": ORT_LEVEL, "skipped_fusions": list(skip_fusions), "graphs": {}}


def optimize_graph(src: Path, dst: Path, *, model_type: str | None, num_heads: int = 0, hidden_size: int = 0,
                   skip_fusions: tuple[str, ...] | list[str] = DEFAULT_SKIP_FUSIONS) -> dict[str, Any]:
    """Write the optimized graph of `src` to `dst`; return its node counts before/after and the fused operators."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    fusion_type = FUSIONS.get(model_type or "")
    disabled = session_settings(skip_fusions)["disabled_optimizers"]
    before = _op_counts(onnx.load(str(src), load_external_data=False))
    source = src
    if fusion_type:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        options = FusionOptions(fusion_type)
        for op in skip_fusions:
            for flag in SLOW_FUSIONS[op][0]:
                setattr(options, flag, False)
        fused = optimize_model(str(src), model_type=fusion_type, num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=options)  # 0: the Python fusions only
        source = dst.with_name(f".fused-{dst.name}")
        fused.save_model_to_file(str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVEL)
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    if source != src:
        source.unlink()
    after = _op_counts(onnx.load(str(dst), load_external_data=False))
    # Fusions are ONNX Runtime contrib operators (com.microsoft Attention, EmbedLayerNormalization, ...; a few such as
    # SimplifiedLayerNormalization sit in the default domain without being standard ONNX), not rewrites into
    # standard operators (Squeeze, Split).
    fused_ops = {op: n for (op, domain), n in after.items() if (op, domain) not in before
                 and (domain == "com.microsoft" or not onnx.defs.has(op, domain))}
    logger.info("optimized %s: %d -> %d nodes, fused %s", src.name, sum(before.values()), sum(after.values()),
                fused_ops or "nothing")
    return {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()), "fused_ops": fused_ops}


def op_counts(path: str | Path) -> dict[str, int]:
    """{op_type: count} of an ONNX file's main graph (weights not loaded)."""
    onnx = require("onnx")
    return dict(Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node))


def _op_counts(model: Any) -> Counter:
    return Counter((node.op_type, node.domain) for node in model.graph.node)
