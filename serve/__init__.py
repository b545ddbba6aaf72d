"""Serving tuneforge bundles: a torch-free ONNX runtime for apps and a Gradio demo."""
