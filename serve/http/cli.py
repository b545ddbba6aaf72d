"""`python -m serve.http BUNDLE [BUNDLE ...]` / `tuneforge-serve`: start the HTTP server with uvicorn.

    tuneforge-serve bundles/reviews bundles/chat --port 8000 --api-key "$KEY"
    tuneforge-serve bundles/reviews --name sentiment=bundles/reviews --threads 2 --demo
"""

from __future__ import annotations

import argparse
import logging
import os

from serve.bundle.errors import exit_on_user_error
from serve.errors import ServeError
from serve.http.config import API_KEY_ENV, Limits, ServerConfig, model_specs

CONFIG_ENV = "TUNEFORGE_SERVER_CONFIG"  # the config as JSON, for uvicorn's worker processes (--workers > 1)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options serve.http and serve.ray share: bundles, names, network, API key, threads, batching, limits."""
    d = Limits()
    parser.add_argument("bundles", nargs="*", help="bundle folders (python -m compress export); the model name is "
                        "the folder's name")
    parser.add_argument("--name", action="append", default=[], metavar="NAME=BUNDLE",
                        help="serve BUNDLE as NAME (renames a bundle listed above, or adds one); repeatable")
    parser.add_argument("--variant", default=None, help="variant to serve (default: each manifest's default_variant)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every route but "
                        f"health (default: ${API_KEY_ENV}; unset: no key)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (each loads every model)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per model run (default 1; 0: one "
                        "per physical core)")
    parser.add_argument("--batch-workers", type=int, default=None, help="classifier batches run at once (default: "
                        "one per core)")
    parser.add_argument("--max-batch-size", type=int, default=1, help="inputs per classifier micro-batch (default 1: "
                        "on CPUs batching mixed-length texts costs more than it saves; raise it on GPUs)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="micro-batch wait for more requests (ms)")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    parser.add_argument("--max-inputs", type=int, default=d.max_inputs, help="texts or images per request")
    parser.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    parser.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap, help="largest max_tokens allowed")
    parser.add_argument("--max-concurrent-generations", type=int, default=d.max_concurrent_generations,
                        help="generations decoding at once per model")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting per model before 503")
    parser.add_argument("--demo", action="store_true", help="also mount the Gradio demo at /demo (its password is "
                        "the API key, if set)")
    parser.add_argument("--log-level", default="info")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed options (the API key falls back to $TUNEFORGE_API_KEY)."""
    if not args.bundles and not args.name:
        parser.error("pass one or more bundle folders")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs,
                    max_text_chars=args.max_text_chars, max_image_pixels=args.max_image_pixels,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens_cap=args.max_tokens_cap,
                    max_concurrent_generations=args.max_concurrent_generations, max_queue=args.max_queue)
    return ServerConfig(models=model_specs(args.bundles, args.name, args.variant), limits=limits,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, threads=args.threads or None,
                        batch_workers=args.batch_workers, max_batch_size=args.max_batch_size,
                        max_wait_ms=args.max_wait_ms, demo=args.demo)


def app_from_env() -> object:
    """uvicorn's factory for worker processes: the app of the config in $TUNEFORGE_SERVER_CONFIG."""
    from serve.http.app import create_app

    return create_app(ServerConfig.from_json(os.environ[CONFIG_ENV]))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m serve.http", description="Serve bundles over HTTP: Open "
                                     "Inference Protocol v2, /v1/classify and the OpenAI API (causal LMs).")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        config = config_from_args(parser, args)
        try:
            import uvicorn

            from serve.http.app import create_app
        except ImportError as err:
            raise ServeError(f"the HTTP server needs {err.name}; pip install 'tuneforge[server]'") from None
        if args.workers > 1:
            if config.demo:
                raise ServeError("--demo runs in a single process; drop --workers or --demo")
            os.environ[CONFIG_ENV] = config.to_json()
            app: object = "serve.http.cli:app_from_env"
        else:
            app = create_app(config)
    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("listening on %s without an API key: anyone who reaches it can use "
                                            "it; set --api-key or $%s", args.host, API_KEY_ENV)
    uvicorn.run(app, host=args.host, port=args.port, workers=args.workers, factory=args.workers > 1,
                log_level=args.log_level, timeout_graceful_shutdown=5)
