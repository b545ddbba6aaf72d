"""The HTTP server's app on Ray Serve: the same routes, replicated across a Ray cluster (one machine or many).

    python -m serve.ray bundles/reviews [bundles/chat ...] --replicas 2 --num-cpus 1 [--port 8000]
    python -m serve.ray bundles/reviews --min-replicas 1 --max-replicas 4 --target-ongoing-requests 8   # autoscaling

Each replica is a Ray actor that loads every bundle once and serves serve.http's FastAPI app through
`@serve.ingress` (built in the replica, so nothing heavy is pickled); Ray's proxy spreads requests over the replicas.
Classifier batching is the runtime's micro-batcher inside each replica by default; `--ray-batch-max-size N` batches
each classifier's requests with Ray's `@serve.batch` instead (docs/serving-http.md has the measurement of both).
On a cluster (`ray start --head` on one machine,
`ray start --address HEAD:6379` on the others, or KubeRay's RayService), bundles must be at the same path on every
node (a shared volume, or baked into the image): `--address auto` connects to it instead of starting a local Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from serve.bundle.errors import exit_on_user_error
from serve.errors import ServeError
from serve.http.cli import add_server_arguments, config_from_args

logger = logging.getLogger(__name__)

APP_NAME = "tuneforge"


def run_requests(run_batch: Callable[[list[Any]], Sequence[Any]], requests: list[list[Any]]) -> list[Any]:
    """One model run over the rows of several requests; each request's results (its slice), or the exception it
    caused: when a batch of several requests fails, each runs again alone, so one bad request cannot fail the others
    (as in the runtime's MicroBatcher)."""
    rows = [row for request in requests for row in request]
    try:
        results = list(run_batch(rows))
        if len(results) != len(rows):
            raise RuntimeError(f"the batch function returned {len(results)} results for {len(rows)} rows")
    except Exception as err:
        if len(requests) == 1:
            return [err]
        return [run_requests(run_batch, [request])[0] for request in requests]
    out, start = [], 0
    for request in requests:
        out.append(results[start:start + len(request)])
        start += len(request)
    return out


def ray_batched(run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int,
                wait_ms: float) -> Callable[[list[Any]], Awaitable[list[Any]]]:
    """A classifier's batch function (rows -> results) behind Ray Serve's `@serve.batch` (call it in a replica):
    each call is one request's rows; Ray gathers up to `max_batch_size` requests (waiting at most `wait_ms` after the
    first) and their rows run once, off the replica's event loop. A request is never split."""
    from ray import serve as ray_serve

    @ray_serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_ms / 1000)
    async def batch(requests: list[list[Any]]) -> list[Any]:
        return await asyncio.to_thread(run_requests, run_batch, requests)

    async def submit(rows: list[Any]) -> list[Any]:
        result = await batch(rows)
        if isinstance(result, BaseException):  # this request's own failure (handed back as a value, not raised)
            raise result
        return result

    return submit


def build_app(config_json: str, *, replicas: int = 1, num_cpus: float = 1.0,
              autoscaling: dict[str, Any] | None = None, max_ongoing_requests: int = 64,
              log_level: str = "info", ray_batch: tuple[int, float] | None = None) -> Any:
    """A Ray Serve application (bind it with `serve.run`) of one deployment serving every bundle of the config.

    config_json: ServerConfig.to_json() (the bundle paths must exist on the nodes that run replicas).
    replicas / num_cpus: replica count and CPUs reserved per replica (set the config's threads to match).
    autoscaling: Ray's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...); replaces
    `replicas`. max_ongoing_requests: requests a replica holds at once before Ray queues them at the proxy.
    log_level: the replicas' log level; below "info" Ray's per-request access log is off too (as uvicorn's is).
    ray_batch: (max_batch_size in requests, wait in ms): batch classifier requests with Ray's @serve.batch instead of
    the runtime's micro-batcher.
    """
    try:
        from ray import serve as ray_serve
    except ImportError:
        raise ServeError("Ray Serve is not installed; pip install 'tuneforge[ray]'") from None

    class TuneforgeServer:
        """One replica: the serve.http app over its own copy of the models."""

        def __init__(self, config_json: str, ray_batch: tuple[int, float] | None = None):
            from serve.http.config import ServerConfig

            self.config, self.ray_batch = ServerConfig.from_json(config_json), ray_batch

        def __serve_build_asgi_app__(self) -> Any:
            from serve.http.app import create_app
            from serve.http.models import Classifier

            app = create_app(self.config)
            if self.ray_batch:
                for model in app.state.models.values():
                    if isinstance(model, Classifier):
                        model.batch_fn = ray_batched(model.run_batch, *self.ray_batch)
            return app

    level = {"TRACE": "DEBUG"}.get(log_level.upper(), log_level.upper())  # uvicorn's trace is Python's debug
    options: dict[str, Any] = {"name": APP_NAME, "ray_actor_options": {"num_cpus": num_cpus},
                               "max_ongoing_requests": max_ongoing_requests,
                               "logging_config": {"log_level": level,
                                                  "enable_access_log": level in ("DEBUG", "INFO")}}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    deployment = ray_serve.deployment(**options)(ray_serve.ingress()(TuneforgeServer))
    return deployment.bind(config_json, tuple(ray_batch) if ray_batch else None)


def app_builder(args: dict[str, Any]) -> Any:
    """The application for a Ray Serve config file (`serve run` / `serve deploy` / KubeRay's RayService):

        applications:
          - name: tuneforge
            import_path: serve.ray:app_builder
            args: {argv: [/models/reviews, --threads, "1", --max-queue, "64"]}

    `argv` takes serve.http's command-line options (bundles, --name, limits, --api-key; the key also comes from
    $TUNEFORGE_API_KEY where the config is deployed). Replicas, CPUs and autoscaling go in the config's
    `deployments` section (name: tuneforge), which overrides the defaults here. `ray_batch_max_size` (and
    `ray_batch_wait_ms`) in args batch classifier requests with Ray's @serve.batch, as on the command line.
    """
    parser = argparse.ArgumentParser(prog="serve.ray:app_builder")
    add_server_arguments(parser)
    argv = args.get("argv") or []
    if isinstance(argv, str):
        argv = argv.split()
    with exit_on_user_error():
        config = config_from_args(parser, parser.parse_args([str(a) for a in argv]))
    size = args.get("ray_batch_max_size")
    return build_app(config.to_json(), ray_batch=(int(size), float(args.get("ray_batch_wait_ms", 0.0))) if size
                     else None)


def run(config_json: str, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        num_cpus_total: int | None = None, blocking: bool = False, **deployment: Any) -> None:
    """Start (or connect to) Ray, start Serve's HTTP proxy on host:port and deploy the app at route prefix /."""
    import ray
    from ray import serve as ray_serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus_total if address is None else None, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}} if address is None
                 else None)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(build_app(config_json, **deployment), name=APP_NAME, route_prefix="/", blocking=blocking)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve.ray", description="Serve bundles with serve.http's routes "
                                     "on Ray Serve replicas.")
    add_server_arguments(parser)
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the deployment (each loads every model)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    parser.add_argument("--min-replicas", type=int, default=None, help="autoscaling: at least this many replicas")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscaling: at most this many replicas")
    parser.add_argument("--target-ongoing-requests", type=float, default=8.0,
                        help="autoscaling: requests per replica Ray aims for")
    parser.add_argument("--max-ongoing-requests", type=int, default=64)
    parser.add_argument("--ray-batch-max-size", type=int, default=None, help="batch classifier requests with Ray's "
                        "@serve.batch (at most this many requests per run) instead of the runtime's micro-batcher")
    parser.add_argument("--ray-batch-wait-ms", type=float, default=0.0, help="with --ray-batch-max-size: how long a "
                        "batch waits for more requests after its first (ms)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster ('auto', or HEAD:6379); default: "
                        "start a local Ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        config = config_from_args(parser, args)
        if config.demo:
            raise ServeError("--demo is not served on Ray; run it with python -m serve.http")
        if args.ray_batch_max_size is not None and (args.ray_batch_max_size < 1 or args.ray_batch_wait_ms < 0):
            raise ServeError("--ray-batch-max-size must be >= 1 and --ray-batch-wait-ms >= 0")
        ray_batch = (args.ray_batch_max_size, args.ray_batch_wait_ms) if args.ray_batch_max_size else None
        autoscaling = None
        if args.min_replicas is not None or args.max_replicas is not None:
            low = args.min_replicas if args.min_replicas is not None else 1
            autoscaling = {"min_replicas": low, "max_replicas": max(args.max_replicas or low, low),
                           "target_ongoing_requests": args.target_ongoing_requests}
        run(config.to_json(), host=args.host, port=args.port, address=args.address, replicas=args.replicas,
            num_cpus=args.num_cpus, autoscaling=autoscaling, max_ongoing_requests=args.max_ongoing_requests,
            log_level=args.log_level, ray_batch=ray_batch)
    logger.info("serving on http://%s:%d (Ctrl+C stops)", args.host, args.port)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop Serve and the local Ray on SIGTERM too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


if __name__ == "__main__":
    main()
