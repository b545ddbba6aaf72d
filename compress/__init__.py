"""Compression of tuneforge runs into bundles: ONNX export with parity gates, graph optimization, pruning and
distillation (quantization follows).

    python -m compress export RUN_DIR --out BUNDLE [--optimize]     # see compress/__main__.py

Modules: manifest (the bundle format and its reader; standard library only), bundle (export_bundle, add_variant),
export (torch.onnx graphs), parity (the gates), optimize (ONNX Runtime fusions), tasks (per-task assets and cases),
inputs and decoding (torch-free graph inputs and KV-cache greedy decoding), source (reading a run directory);
prune (prune_run: a pruned run directory), units (the heads, FFN neurons and channels of a network), structured
(scoring and removing them), sparsity (global magnitude pruning), distill (kd_loss, layer-subset students,
distill_run), launch (running a recipe), run_data (a run's data for importance scores and evaluation).
Importing this package is cheap: torch, onnx and onnxruntime load inside the functions that need them.
"""
