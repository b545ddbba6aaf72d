"""Serving tuneforge bundles: a torch-free ONNX runtime for apps and a Gradio demo.

    runtime      load(bundle) -> TextClassifier | ImageClassifier | TextGenerator (numpy, onnxruntime, tokenizers)
    predictors   classifiers over any forward function; generation: sampling and streamed text; batching: micro-batches
    explain      why a classifier decided: word / pixel attributions from the bundle itself, and their faithfulness
    pytorch      the same predictors over a run directory's PyTorch model (the demo's baseline)
    app          build_demo(...) -> gr.Blocks and `python -m serve` (sources: what the demo serves; sketch: drawings)
    login        who may use the demo: the login (flag, file or environment) and a throttle for failed logins
    http         the HTTP server: `python -m serve.http BUNDLE` (Open Inference Protocol v2, OpenAI API, metrics)
    ray          the same server on Ray Serve replicas: `python -m serve.ray BUNDLE --replicas N`

Importing this package is cheap: onnxruntime, tokenizers, gradio and torch load inside the functions that need them.
"""
