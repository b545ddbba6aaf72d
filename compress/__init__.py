"""Compression of tuneforge runs: ONNX export with parity gates, quantization, pruning, distillation."""
