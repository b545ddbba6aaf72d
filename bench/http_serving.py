"""Benchmark: the HTTP server (serve.http) against the in-process runtime, a hand-written FastAPI + onnxruntime
endpoint (bench/http_peer.py) and Ray Serve (serve.ray, 1 and 2 replicas), all on the same bundle in one run.

    python bench/http_serving.py                    # MiniLM int8 (built as bench/runtime_serving.py does)
    python bench/http_serving.py --bundle bundles/text_default --lm-bundle bundles/chat --requests 400

(Not bench/http.py: a script's folder comes first on sys.path, so a bench/http.py would hide the standard library's
`http` package from every script in bench/.)

Classifiers: closed-loop clients (1, 8 and 32 at once), each sending one SST-2 test sentence per request over a
keep-alive connection (in-process: a predict call per request, from as many threads); requests/s over all clients,
p50/p95 per request, errors. serve.http runs its defaults (one ONNX Runtime thread per run, one batch worker per core,
batches of one request), the peer ONNX Runtime's defaults (what a user gets); each Ray replica 1 CPU, 1 thread, 1
worker; then the same replicas with Ray's @serve.batch in place of the micro-batcher (serve.ray --ray-batch-max-size).
Server rows carry mean_batch_size: inputs per model run, from the server's /metrics (Ray: one replica's).
--batch-sweep adds the in-process runtime at 32 clients with other batching settings (why the defaults).
Generation (with --lm-bundle): over the OpenAI API (streamed, greedy), time to first token and tokens/s of one
stream, and aggregate tokens/s at 4 and 8 streams, against the runtime in-process (threads).
The client runs on the same machine as the server: on a small shared machine it takes cores from it (the JSON says
how many cores and the load average). Prints a table and writes bench/results/http.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, machine, write_result

CLIENTS = (1, 8, 32)
STREAMS = (1, 4, 8)
SST2 = REPO.parent / "shared" / "data" / "sst2" / "test.tsv"
FALLBACK = ["A wonderful little film.", "Dull and far too long.", "The cast is superb.", "I wanted my money back."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, help="a text-classification bundle (default: MiniLM int8, built as "
                        "bench/runtime_serving.py does)")
    parser.add_argument("--variant", help="variant to serve (default: the first int8* one, else the default)")
    parser.add_argument("--lm-bundle", type=Path, help="a causal-LM bundle for the generation part (skipped without)")
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--only-ray", action="store_true", help="only the Ray rows on 1 replica, the runtime's "
                        "micro-batcher and @serve.batch alternating (a paired comparison of the two batchers)")
    parser.add_argument("--batch-sweep", action="store_true", help="also measure other micro-batching settings")
    parser.add_argument("--only-generation", action="store_true", help="measure generation only (--lm-bundle) and "
                        "replace that part of an existing --out JSON")
    parser.add_argument("--builtin-texts", action="store_true", help="4 short built-in sentences instead of SST-2 "
                        "(for the tiny test bundles, whose vocabulary and positions are small)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "http.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    if args.only_generation:
        if not args.lm_bundle:
            parser.error("--only-generation needs --lm-bundle")
        result = json.loads(args.out.read_text())
        result.update(lm_bundle=describe(args.lm_bundle), generation_machine=machine(),
                      generation=generation_rows(args.lm_bundle, args.max_tokens))
        print_table(result)
        write_result(args.out, result)
        print(f"wrote {args.out}")
        return
    bundle = args.bundle or build_minilm()
    variant = args.variant or first_int8(bundle)
    texts = FALLBACK if args.builtin_texts else sentences()
    result: dict = {"machine": machine(), "bundle": describe(bundle), "variant": variant, "clients": list(CLIENTS),
                    "texts": "built-in" if args.builtin_texts else "SST-2 test sentences",
                    "requests_per_configuration": args.requests,
                    "note": "client and server share this machine's cores; the machine was shared with other work "
                            "(see load_average)", "classify": []}
    rows = result["classify"]
    if args.only_ray:
        rows += ray_rows(bundle, variant, texts, args.requests, paired=True)
        result["targets"] = {}
        print_table(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_result(args.out, result)
        print(f"wrote {args.out}")
        return
    rows += inprocess_rows(bundle, variant, texts, args.requests, cores)
    server = [sys.executable, "-m", "serve.http", f"--name=m={bundle}", "--variant", variant, "--threads", "1",
              "--batch-workers", str(cores), "--max-batch-size", "1", "--max-queue", "256", "--log-level", "warning"]
    rows += http_rows("server (serve.http, 1 process)", server, texts, args.requests)
    peer = [sys.executable, "-m", "uvicorn", "--app-dir", "bench", "http_peer:app", "--log-level", "warning"]
    rows += http_rows("hand-written FastAPI + onnxruntime", peer, texts, args.requests,
                      env={"TUNEFORGE_PEER_BUNDLE": str(bundle), "TUNEFORGE_PEER_VARIANT": variant})
    if not args.skip_ray:
        rows += ray_rows(bundle, variant, texts, args.requests)
    if args.batch_sweep:
        result["batch_sweep_32_clients"] = batch_sweep(bundle, variant, texts, args.requests, cores)
    result["targets"] = targets(rows)
    if args.lm_bundle:
        result["lm_bundle"] = describe(args.lm_bundle)
        result["generation"] = generation_rows(args.lm_bundle, args.max_tokens)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)
    print(f"wrote {args.out}")


# --- inputs ---------------------------------------------------------------------------------------------------------

def build_minilm() -> Path:
    """bench/runtime_serving.py's MiniLM bundle (a short fine-tune, then compress/text_default.yaml), built once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).with_name("serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_bundle(40)[0]


def describe(bundle: Path) -> str:
    """The bundle's folder name and the model it was made from (no machine paths)."""
    base = json.loads((bundle / "manifest.json").read_text()).get("source_run", {}).get("base_model")
    return f"{bundle.name} ({base})" if base else bundle.name


def first_int8(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return next((n for n in manifest["variants"] if n.startswith("int8")), manifest["default_variant"])


def sentences() -> list[str]:
    if not SST2.is_file():
        return FALLBACK
    lines = SST2.read_text().splitlines()[1:]
    return [line.split("\t")[0] for line in lines if line.strip()]


# --- classifiers ----------------------------------------------------------------------------------------------------

def summary(latencies_s: list[float], wall: float, errors: int) -> dict:
    ms = sorted(x * 1000 for x in latencies_s)
    return {"requests": len(ms), "errors": errors, "requests_per_s": round(len(ms) / wall, 1),
            "p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2)}


def closed_loop(clients: int, total: int, call) -> dict:
    """`clients` threads calling `call(index)` one after another, `total` calls in all."""
    per_client = max(total // clients, 5)
    errors = [0]

    def client(c: int) -> list[float]:
        out = []
        for i in range(per_client):
            start = time.perf_counter()
            if not call(c * per_client + i):
                errors[0] += 1
            out.append(time.perf_counter() - start)
        return out

    for i in range(min(16, total)):  # warm-up
        call(i)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(client, range(clients)) for x in part]
    return summary(latencies, time.perf_counter() - start, errors[0])


def inprocess_rows(bundle: Path, variant: str, texts: list[str], total: int, cores: int) -> list[dict]:
    from serve import runtime

    # The server's defaults: 1 thread per run, one batch worker per core, batches of one request.
    model = runtime.load(bundle, variant, threads=1, batching=runtime.BatchingConfig(1, 0.0, workers=cores))
    rows = []
    for clients in CLIENTS:
        row = closed_loop(clients, total, lambda i: bool(model.predict([texts[i % len(texts)]])))
        rows.append({"system": "runtime in-process", "clients": clients, **row})
        print(rows[-1], flush=True)
    model.close()
    return rows


def ray_rows(bundle: Path, variant: str, texts: list[str], total: int, *, paired: bool = False) -> list[dict]:
    """serve.ray, each replica 1 CPU, 1 thread: the runtime's micro-batcher (1 batch worker; its defaults, batches of
    one request, and batches of up to 8 waiting 10 ms) and Ray's @serve.batch in its place (up to 8 requests per run,
    taking what waits, 0 ms, or Ray's default wait, 10 ms). paired: 1 replica only, the two batchers alternating."""
    micro = ["--batch-workers", "1"]
    configs = [("Ray Serve, {r}", 1, micro), ("Ray Serve, {r}", 2, micro),
               ("Ray Serve @serve.batch(8, 0 ms), {r}", 1, ["--ray-batch-max-size", "8", "--ray-batch-wait-ms", "0"]),
               ("Ray Serve @serve.batch(8, 0 ms), {r}", 2, ["--ray-batch-max-size", "8", "--ray-batch-wait-ms", "0"]),
               ("Ray Serve, micro-batcher(8, 10 ms), {r}", 1, [*micro, "--max-batch-size", "8", "--max-wait-ms", "10"]),
               ("Ray Serve @serve.batch(8, 10 ms), {r}", 1, ["--ray-batch-max-size", "8", "--ray-batch-wait-ms", "10"])]
    if paired:
        configs = [c for c in configs if c[1] == 1]
    rows = []
    for name, replicas, extra in configs:
        cmd = [sys.executable, "-m", "serve.ray", f"--name=m={bundle}", "--variant", variant, "--threads", "1",
               "--replicas", str(replicas), "--num-cpus", "1", "--max-queue", "256", "--log-level", "warning", *extra]
        rows += http_rows(name.format(r=f"{replicas} replica{'s' * (replicas > 1)}"), cmd, texts, total,
                          env={"RAY_USAGE_STATS_ENABLED": "0"}, start_timeout=180)
    return rows


def batch_sweep(bundle: Path, variant: str, texts: list[str], total: int, cores: int) -> list[dict]:
    """The runtime in-process at 32 clients: unbatched (ONNX Runtime threads 1 and all cores) and micro-batched with
    batches of up to 1, 4 and 32 requests."""
    from serve import runtime

    settings = [("unbatched, threads = cores", 0, None), ("unbatched, 1 thread", 1, None)]
    settings += [(f"max_batch_size {n}, {cores} workers, 1 thread", 1, runtime.BatchingConfig(n, 0.0, cores))
                 for n in (1, 4, 32)]
    rows = []
    for name, threads, config in settings:
        model = runtime.load(bundle, variant, threads=threads or None, batching=config)
        rows.append({"setting": name, **closed_loop(32, total, lambda i, m=model: bool(m.predict([texts[i % len(
            texts)]])))})
        print(rows[-1], flush=True)
        model.close()
    return rows


@contextmanager
def process(cmd: list[str], port: int, env: dict[str, str] | None = None, timeout: float = 120,
            is_ready: Callable[[int], bool] | None = None):
    """A server subprocess on 127.0.0.1:port, up once `is_ready(port)` (default: it answers a classify request),
    stopped with SIGINT (Ray shuts its local cluster down on it)."""
    log = REPO / "runs" / "bench_http" / f"server_{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while not (is_ready or ready)(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{' '.join(cmd)} did not start; see {log}")
            time.sleep(0.5)
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(port: int) -> bool:
    """The server answers a classify request (the peer has no health route)."""
    try:
        return post(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "/v1/classify",
                    {"model": "m", "inputs": ["warm up"]}) == 200
    except OSError:
        return False


def health_ready(port: int) -> bool:
    """The server says it is ready (a causal-LM server has no classify route)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False


def post(conn: http.client.HTTPConnection, path: str, body: dict) -> int:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def http_rows(system: str, cmd: list[str], texts: list[str], total: int, env: dict[str, str] | None = None,
              start_timeout: float = 120) -> list[dict]:
    port = free_port()
    rows = []
    with process(cmd, port, env, start_timeout):
        for clients in CLIENTS:
            local = threading.local()

            def call(i: int, local: threading.local = local) -> bool:
                if not hasattr(local, "conn"):
                    local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                try:
                    return post(local.conn, "/v1/classify", {"model": "m", "inputs": [texts[i % len(texts)]]}) == 200
                except (OSError, http.client.HTTPException):
                    local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    return False

            before = batch_sizes(port)
            rows.append({"system": system, "clients": clients, **closed_loop(clients, total, call)})
            after = batch_sizes(port)
            if before and after and after[1] > before[1]:  # inputs per model run (Ray: one replica's /metrics)
                rows[-1]["mean_batch_size"] = round((after[0] - before[0]) / (after[1] - before[1]), 2)
            print(rows[-1], flush=True)
    return rows


def batch_sizes(port: int) -> tuple[float, float] | None:
    """(sum, count) of the server's batch-size histogram for model m, or None (the peer has no /metrics)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    except (OSError, http.client.HTTPException):
        return None
    if response.status != 200:
        return None
    values = {}
    for line in text.splitlines():
        for key in ("sum", "count"):
            if line.startswith(f'tuneforge_batch_size_{key}{{model="m"}}'):
                values[key] = float(line.split()[-1])
    return (values["sum"], values["count"]) if len(values) == 2 else None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def targets(rows: list[dict]) -> dict:
    """The issue's targets: server p50 at 1 client within 1 ms of in-process; at 32 clients >= 1.2x the hand-written
    endpoint's requests/s, lower p95, 0 errors."""
    by = {(r["system"], r["clients"]): r for r in rows}
    server, peer, local = "server (serve.http, 1 process)", "hand-written FastAPI + onnxruntime", "runtime in-process"
    out = {}
    if (server, 1) in by and (local, 1) in by:
        added = by[(server, 1)]["p50_ms"] - by[(local, 1)]["p50_ms"]
        out["server_p50_added_ms_at_1"] = {"value": round(added, 2), "target": "<= 1", "met": added <= 1}
    if (server, 32) in by and (peer, 32) in by:
        ratio = by[(server, 32)]["requests_per_s"] / by[(peer, 32)]["requests_per_s"]
        out["server_over_peer_rps_at_32"] = {"value": round(ratio, 2), "target": ">= 1.2", "met": ratio >= 1.2}
        lower = by[(server, 32)]["p95_ms"] < by[(peer, 32)]["p95_ms"]
        out["server_p95_below_peer_at_32"] = {"value": [by[(server, 32)]["p95_ms"], by[(peer, 32)]["p95_ms"]],
                                              "met": lower}
        out["server_errors_at_32"] = {"value": by[(server, 32)]["errors"], "target": 0,
                                      "met": by[(server, 32)]["errors"] == 0}
    return out


# --- generation -----------------------------------------------------------------------------------------------------

PROMPT = "Once upon a time, in a quiet village by the sea,"


def stream_stats(streams: list[tuple[float, float, int]], wall: float) -> dict:
    """(time to first token, seconds from first token to the end, tokens) per stream -> the row."""
    ttft = [s[0] * 1000 for s in streams]
    tokens = sum(s[2] for s in streams)
    per_stream = [(s[2] - 1) / s[1] for s in streams if s[1] > 0 and s[2] > 1]
    return {"ttft_ms_median": round(statistics.median(ttft), 1), "tokens": tokens,
            "decode_tokens_per_s_per_stream": round(statistics.median(per_stream), 1) if per_stream else None,
            "aggregate_tokens_per_s": round(tokens / wall, 1)}


def run_streams(count: int, one) -> dict:
    one()  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        streams = list(pool.map(lambda _: one(), range(count)))
    return stream_stats(streams, time.perf_counter() - start)


def generation_rows(bundle: Path, max_tokens: int) -> list[dict]:
    from serve import runtime

    generator = runtime.load(bundle, threads=1)

    def local() -> tuple[float, float, int]:
        start, first, n = time.perf_counter(), None, 0
        for _ in generator.tokens(PROMPT, max_new_tokens=max_tokens, do_sample=False):
            n += 1
            first = first or time.perf_counter()
        return first - start, time.perf_counter() - first, n

    rows = []
    for streams in STREAMS:
        rows.append({"system": "runtime in-process", "streams": streams, **run_streams(streams, local)})
        print(rows[-1], flush=True)
    from openai import OpenAI

    port = free_port()
    cmd = [sys.executable, "-m", "serve.http", f"--name=m={bundle}", "--threads", "1", "--max-concurrent-generations",
           str(max(STREAMS)), "--max-tokens-cap", str(max_tokens), "--log-level", "warning"]
    with process(cmd, port, is_ready=health_ready):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def remote() -> tuple[float, float, int]:
            start, first, usage = time.perf_counter(), None, None
            for chunk in client.completions.create(model="m", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter()
                usage = chunk.usage or usage
            return first - start, time.perf_counter() - first, usage.completion_tokens

        for streams in STREAMS:
            rows.append({"system": "server (OpenAI API, streamed)", "streams": streams, **run_streams(streams, remote)})
            print(rows[-1], flush=True)
    return rows


# --- report ---------------------------------------------------------------------------------------------------------

def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, load average {m['load_average_1_5_15min']}; bundle {result['bundle']} "
          f"({result['variant']}), {result['requests_per_configuration']} requests per row")
    print(f"{'system':46s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'errors':>6s} {'batch':>6s}")
    for r in result["classify"]:
        print(f"{r['system']:46s} {r['clients']:7d} {r['requests_per_s']:8.1f} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} "
              f"{r['errors']:6d} {r.get('mean_batch_size', ''):>6}")
    for name, t in result["targets"].items():
        print(f"target {name}: {t['value']} ({t.get('target', '')}) {'met' if t['met'] else 'NOT met'}")
    for r in result.get("batch_sweep_32_clients", []):
        print(f"in-process, 32 clients, {r['setting']:38s} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:.1f} ms  "
              f"p95 {r['p95_ms']:.1f} ms")
    if result.get("generation"):
        print(f"\ngeneration: {result['lm_bundle']}, greedy")
        print(f"{'system':34s} {'streams':>7s} {'TTFT ms':>8s} {'tok/s/stream':>12s} {'aggregate tok/s':>15s}")
        for r in result["generation"]:
            print(f"{r['system']:34s} {r['streams']:7d} {r['ttft_ms_median']:8.1f} "
                  f"{r['decode_tokens_per_s_per_stream'] or 0:12.1f} {r['aggregate_tokens_per_s']:15.1f}")


if __name__ == "__main__":
    main()
