"""Compression of tuneforge runs into bundles: ONNX export with parity gates, graph optimization (quantization,
pruning and distillation follow).

    python -m compress export RUN_DIR --out BUNDLE [--optimize]     # see compress/__main__.py

Modules: manifest (the bundle format and its reader; standard library only), bundle (export_bundle, add_variant),
export (torch.onnx graphs), parity (the gates), optimize (ONNX Runtime fusions), tasks (per-task assets and cases),
inputs and decoding (torch-free graph inputs and KV-cache greedy decoding), source (reading a run directory).
Importing this package is cheap: torch, onnx and onnxruntime load inside the functions that need them.
"""
