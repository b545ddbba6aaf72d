"""The "optimized" variant: ONNX Runtime graph optimizations applied offline and saved, so sessions load fused graphs.

Two passes: onnxruntime.transformers' fusions (attention, embedding + LayerNorm, skip LayerNorm, GELU) for the model
families they are written for, then ORT's own optimizer at ORT_ENABLE_EXTENDED. Not ORT_ENABLE_ALL: its layout
transformations depend on the CPU that saves the file (NCHWc block size follows the ISA), and a session applies
them at load time anyway. The result is parity-gated like any other variant.
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


def optimization_settings(model_type: str | None) -> dict[str, Any]:
    """The manifest's `optimization` entry (its per-graph statistics are added under "graphs")."""
    fusions = FUSIONS.get(model_type or "")
    return {"method": (f"onnxruntime.transformers fusions ({fusions}) + " if fusions else "") + ORT_LEVEL,
            "fusions": fusions, "ort_level": ORT_LEVEL, "graphs": {}}


def optimize_graph(src: Path, dst: Path, *, model_type: str | None, num_heads: int = 0,
                   hidden_size: int = 0) -> dict[str, Any]:
    """Write the optimized graph of `src` to `dst`; return its node counts before/after and the fused operators."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    fusion_type = FUSIONS.get(model_type or "")
    before = _op_counts(onnx.load(str(src), load_external_data=False))
    source = src
    if fusion_type:
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(str(src), model_type=fusion_type, num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0)  # 0: the Python fusions only; ORT's own pass follows
        source = dst.with_name(f".fused-{dst.name}")
        fused.save_model_to_file(str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVEL)
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    if source != src:
        source.unlink()
    after = _op_counts(onnx.load(str(dst), load_external_data=False))
    # Fusions are ONNX Runtime contrib operators (com.microsoft Attention, SkipLayerNormalization, ...; a few such as
    # SimplifiedLayerNormalization sit in the default domain without being standard ONNX), not rewrites into
    # standard operators (Squeeze, Split).
    fused_ops = {op: n for (op, domain), n in after.items() if (op, domain) not in before
                 and (domain == "com.microsoft" or not onnx.defs.has(op, domain))}
    logger.info("optimized %s: %d -> %d nodes, fused %s", src.name, sum(before.values()), sum(after.values()),
                fused_ops or "nothing")
    return {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()), "fused_ops": fused_ops}


def _op_counts(model: Any) -> Counter:
    return Counter((node.op_type, node.domain) for node in model.graph.node)
