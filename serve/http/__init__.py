"""An HTTP inference server on the torch-free runtime: Open Inference Protocol v2, a plain JSON route and an
OpenAI-compatible API, with Prometheus metrics.

    python -m serve.http bundles/reviews bundles/chat [--port 8000] [--api-key KEY]     # or: tuneforge-serve ...

    config       ServerConfig: limits, API key, threads, batching (one typed record; the CLI and Ray fill it)
    models       ServedModel: a bundle's predictor behind admission control (micro-batcher, generation slots)
    app          create_app(config) -> FastAPI: health, metadata, /v2 infer, /v1/classify, OpenAI routes, /metrics
    ray          (serve.ray) the same app on Ray Serve

Imports fastapi, starlette, pydantic and prometheus-client on top of the runtime's numpy / onnxruntime / tokenizers /
Pillow; never torch (tests/test_http_server.py checks). Install with `pip install 'tuneforge[server]'`.
"""

from serve.http.config import ServerConfig

__all__ = ["ServerConfig"]
