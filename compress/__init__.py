"""Compression of tuneforge runs into bundles: ONNX export with parity gates, graph optimization, int8 quantization
behind numeric and task-metric gates, structured and unstructured pruning, distillation, latency measurement and a
trade-off report.

    python -m compress export RUN_DIR --out BUNDLE [--optimize]     # see compress/__main__.py
    python -m compress run --config recipes/configs/compress/text_default.yaml

Modules: manifest (the bundle format and its reader; standard library only), bundle (export_bundle, add_variant),
export (torch.onnx graphs), parity (the parity gate), optimize (ONNX Runtime fusions), quantize (int8 and its ladder),
metric_gate (the task-metric gate), latency (p50 / p95 timing), report (report.md / .json / tradeoff.png), pipeline
(the stages of `compress run`), tasks (per-task assets, cases, eval data), inputs and decoding (torch-free graph
inputs and KV-cache greedy decoding), source (reading a run directory); prune (prune_run: a pruned run directory),
units (the heads, FFN neurons and channels of a network), structured (scoring and removing them), sparsity (global
magnitude pruning), distill (kd_loss, layer-subset students, distill_run), launch (running a recipe), run_data (a
run's data for importance scores and evaluation).
Importing this package is cheap: torch, onnx and onnxruntime load inside the functions that need them.
"""
