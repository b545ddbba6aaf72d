"""Benchmark: the torch-free runtime serving a MiniLM int8 bundle: throughput and latency at 1, 4 and 8 concurrent
callers with and without micro-batching; cold start and memory against loading the PyTorch model.

    python bench/runtime_serving.py                                # short MiniLM run + bundle under runs/bench_serve/
    python bench/runtime_serving.py --bundle BUNDLE --run RUN_DIR  # an existing bundle (with an int8 variant), its run

Without --bundle it fine-tunes all-MiniLM-L6-v2 on the embedded reviews for --train-steps steps (the default recipe)
and compresses it with recipes/configs/compress/text_default.yaml. The variant served is --variant, else the bundle's
first int8 variant (the quickstart's bundles/text_default works: --bundle bundles/text_default).

Throughput: each caller thread sends single-sentence requests (the run's eval split) one after another; requests/s
over all callers, p50/p95 per request. Modes: unbatched, micro-batched by one worker, each with 1 ONNX Runtime thread
per run and with one per core, and micro-batched by one worker per core (1 thread each). The targets compare the best
setting of each mode. Also the graph's own cost per item at batch 1, 8 and 32 (20 tokens): what batching can save.
Cold start: a fresh subprocess from interpreter start to the first prediction (imports, load, first run), median of
--cold-runs, for `serve.runtime.load` against transformers' from_pretrained + tokenizer; peak RSS (VmHWM) of each.
Prints a table and writes JSON (default bench/results/serve.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# This script's folder comes first on sys.path, where its own name would hide the `serve` package: the repository
# goes before it (an editable install's import hook comes after every sys.path entry, so moving the folder last is
# not enough).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, machine, run_measured, write_result

WORK = REPO / "runs" / "bench_serve"
CALLERS = (1, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, help="an existing text-classification bundle (default: build one)")
    parser.add_argument("--run", type=Path, help="the run directory of --bundle (default: its source_run)")
    parser.add_argument("--variant", help="the variant to serve (default: the first int8* variant)")
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the MiniLM run made without --bundle")
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration (split over callers)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    parser.add_argument("--cold-start-worker", nargs=3, metavar=("KIND", "PATH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_start_worker:
        return cold_start_worker(*args.cold_start_worker)

    bundle, run = (args.bundle, args.run) if args.bundle else build_bundle(args.train_steps)
    run = run or Path(json.loads((bundle / "manifest.json").read_text())["source_run"]["path"])
    variant = int8_variant(bundle, args.variant)
    texts = eval_texts(run)
    cores = os.cpu_count() or 1
    rows = throughput(bundle, variant, texts, cores, args)
    batch_cost = model_cost_per_item(bundle, variant)
    cold = cold_starts(bundle, run, variant, args.cold_runs)
    result = {"machine": machine(), "bundle": str(bundle), "variant": variant,
              "requests_per_configuration": args.requests, "batching": {"max_batch_size": args.max_batch_size,
                                                                        "max_wait_ms": args.max_wait_ms,
                                                                        "workers": [1, cores]},
              "throughput": rows, "model_ms_per_item_by_batch": batch_cost, "cold_start": cold,
              "targets": targets(rows, cold)}
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)
    print(f"wrote {args.out}")


# --- the bundle -----------------------------------------------------------------------------------------------------

def build_bundle(steps: int) -> tuple[Path, Path]:
    """A short MiniLM fine-tune on the embedded reviews (the default recipe), compressed by the shipped
    compress/text_default.yaml (export, optimize, gated dynamic and static int8)."""
    run, bundle = WORK / "run", WORK / "bundle"
    if not (bundle / "manifest.json").is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        recipe = [sys.executable, "recipes/text_classification.py", "--config",
                  "recipes/configs/text_classification/default.yaml", f"train.output_dir={run}", "train.overwrite=true",
                  f"train.max_steps={steps}"]
        print(f"fine-tuning MiniLM for {steps} steps ...", flush=True)
        run_measured(recipe, WORK / "run.log")
        run_measured([sys.executable, "-m", "compress", "run", "--config", "recipes/configs/compress/text_default.yaml",
                      f"run_dir={run}", f"out={bundle}", "latency.runs=20"], WORK / "compress.log")
    return bundle, run


def int8_variant(bundle: Path, wanted: str | None) -> str:
    """The variant to serve: `wanted`, else the bundle's first int8 variant."""
    from serve.bundle.manifest import read_manifest

    variants = read_manifest(bundle, verify=False).variants
    name = wanted or next((n for n in variants if n.startswith("int8")), None)
    if name not in variants:
        raise SystemExit(f"{bundle} has no variant {wanted!r}" if wanted else
                         f"{bundle} has no int8 variant; compress it with recipes/configs/compress/text_default.yaml")
    return name


def eval_texts(run: Path) -> list[str]:
    """The run's eval-split texts (the requests)."""
    from compress.source import read_run, run_data_config, text_splits

    run_ = read_run(run)
    cfg, _ = run_data_config(run_)
    return [t if isinstance(t, str) else "" for t in text_splits(run_)["eval"][cfg.text_column]]


# --- throughput -----------------------------------------------------------------------------------------------------

def throughput(bundle: Path, variant: str, texts: list[str], cores: int, args: argparse.Namespace) -> list[dict]:
    from serve import runtime

    batching = runtime.BatchingConfig(args.max_batch_size, args.max_wait_ms)
    per_core = runtime.BatchingConfig(args.max_batch_size, args.max_wait_ms, workers=cores)
    modes = [("unbatched", 1, None), ("unbatched", cores, None), ("micro-batched", 1, batching),
             ("micro-batched", cores, batching), (f"micro-batched x{cores}", 1, per_core)]
    rows = []
    for mode, threads, config in modes:
        for callers in CALLERS:
            model = runtime.load(bundle, variant, threads=threads, batching=config, verify=False)
            row = measure(model, texts, callers, max(args.requests // callers, 10))
            rows.append({"mode": mode, "threads": threads, "callers": callers, **row})
            print(f"{mode:14s} threads {threads} callers {callers}: {row['requests_per_s']:8.1f} req/s, "
                  f"p50 {row['p50_ms']:.2f} ms, p95 {row['p95_ms']:.2f} ms", flush=True)
            if config:
                model.close()
    return rows


def measure(model, texts: list[str], callers: int, per_caller: int) -> dict:
    """Closed loop: each caller sends one sentence, waits for its answer, sends the next."""
    import numpy as np

    for text in texts[:16]:  # warm-up: allocations and the first runs
        model.predict([text])

    def caller(index: int) -> list[float]:
        latencies = []
        for i in range(per_caller):
            start = time.perf_counter()
            model.predict([texts[(index * per_caller + i) % len(texts)]])
            latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        latencies = np.concatenate(list(pool.map(caller, range(callers)))) * 1000
    wall = time.perf_counter() - start
    sizes = list(model.batcher.batch_sizes) if model.batcher else []
    return {"requests": int(latencies.size), "requests_per_s": round(latencies.size / wall, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p95_ms": round(float(np.percentile(latencies, 95)), 2),
            "mean_batch_size": round(float(np.mean(sizes)), 2) if sizes else 1.0}


def model_cost_per_item(bundle: Path, variant: str, length: int = 20) -> dict[str, float]:
    """Best-of-N milliseconds per item of the graph alone (1 thread, no tokenization) at batch 1, 8 and 32."""
    import numpy as np

    from serve.bundle.manifest import read_manifest
    from serve.runtime import create_session

    session = create_session(read_manifest(bundle, verify=False).graph_path(variant), threads=1)
    names = [i.name for i in session.get_inputs()]
    cost = {}
    for batch in (1, 8, 32):
        feeds = {"input_ids": np.full((batch, length), 1000, np.int64), "attention_mask": np.ones((batch, length),
                 np.int64), "token_type_ids": np.zeros((batch, length), np.int64)}
        feeds = {k: v for k, v in feeds.items() if k in names}
        times = []
        for _ in range(max(5, 160 // batch)):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        cost[str(batch)] = round(min(times) * 1000 / batch, 3)
    print(f"graph cost per item (ms, batch: cost): {cost}", flush=True)
    return cost


# --- cold start -----------------------------------------------------------------------------------------------------

def cold_starts(bundle: Path, run: Path, variant: str, repeats: int) -> dict:
    """Median time to first prediction and peak RSS of fresh processes (one unmeasured run first warms the disk
    cache for both)."""
    out = {}
    WORK.mkdir(parents=True, exist_ok=True)
    for kind, path in (("runtime", bundle), ("pytorch", run / "model")):
        cmd = [sys.executable, __file__, "--cold-start-worker", kind, str(path), variant]
        run_measured(cmd, WORK / f"cold_{kind}.log")
        samples = []
        for _ in range(repeats):
            # run_measured's ru_maxrss would count this (large) parent process, which the child starts as a fork of;
            # the worker reports its own peak (VmHWM) instead.
            wall, _ = run_measured(cmd, WORK / f"cold_{kind}.log")
            inner = json.loads((WORK / f"cold_{kind}.log").read_text().strip().splitlines()[-1])
            samples.append({"process_wall_s": wall, **inner})
        out[kind] = {key: round(statistics.median(s[key] for s in samples), 3) for key in samples[0]
                     if isinstance(samples[0][key], float | int)}
    return out


def cold_start_worker(kind: str, path: str, variant: str) -> None:
    """In a fresh process: imports + load + first prediction, timed from here (interpreter start-up aside)."""
    start = time.perf_counter()
    text = "The staff were friendly and the food arrived quickly."
    if kind == "runtime":
        from serve import runtime

        imported = time.perf_counter()
        model = runtime.load(path, variant)
        loaded = time.perf_counter()
        model.predict([text])
    else:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        imported = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        loaded = time.perf_counter()
        with torch.inference_mode():
            model(**tokenizer([text], return_tensors="pt")).logits.softmax(-1)
    done = time.perf_counter()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mib = {key: int(status[field].split()[0]) / 1024  # kB -> MiB
           for key, field in (("peak_rss_mib", "VmHWM"), ("rss_mib", "VmRSS"))}
    print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "first_prediction_s": done - loaded,
                      "to_first_prediction_s": done - start, **mib}))


# --- report ---------------------------------------------------------------------------------------------------------

def targets(rows: list[dict], cold: dict) -> dict:
    def at(mode: str, threads: int | None = None) -> dict:
        picked = [r for r in rows if r["mode"].startswith(mode) and r["callers"] == 8
                  and threads in (None, r["threads"])]
        return max(picked, key=lambda r: r["requests_per_s"])

    batched, unbatched = at("micro-batched"), at("unbatched")  # the best setting of each
    runtime, pytorch = cold["runtime"], cold["pytorch"]
    checks = {
        "batched_throughput_x_unbatched_at_8": (round(batched["requests_per_s"] / unbatched["requests_per_s"], 2), 3.0,
                                                ">="),
        "batched_p95_over_p50_at_8": (round(batched["p95_ms"] / batched["p50_ms"], 2), 2.0, "<="),
        "cold_start_runtime_over_pytorch": (round(runtime["to_first_prediction_s"] / pytorch["to_first_prediction_s"],
                                                  3), 1 / 3, "<="),
        "rss_runtime_over_pytorch": (round(runtime["peak_rss_mib"] / pytorch["peak_rss_mib"], 3), 1 / 3, "<="),
    }
    return {name: {"value": value, "target": f"{op} {target:.3g}",
                   "met": value >= target if op == ">=" else value <= target}
            for name, (value, target, op) in checks.items()}


def print_table(result: dict) -> None:
    print(f"\n{result['variant']} of {result['bundle']}")
    print(f"{'mode':14s} {'threads':>7s} {'callers':>7s} {'req/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'batch':>6s}")
    for r in result["throughput"]:
        print(f"{r['mode']:14s} {r['threads']:7d} {r['callers']:7d} {r['requests_per_s']:9.1f} {r['p50_ms']:8.2f} "
              f"{r['p95_ms']:8.2f} {r['mean_batch_size']:6.2f}")
    print(f"\n{'cold start':10s} {'import s':>9s} {'load s':>8s} {'1st pred s':>10s} {'total s':>8s} {'RSS MiB':>8s}")
    for kind, c in result["cold_start"].items():
        print(f"{kind:10s} {c['import_s']:9.3f} {c['load_s']:8.3f} {c['first_prediction_s']:10.3f} "
              f"{c['to_first_prediction_s']:8.3f} {c['peak_rss_mib']:8.1f}")
    print()
    costs = " / ".join(map(str, result["model_ms_per_item_by_batch"].values()))
    print(f"graph cost per item (ms) at batch 1 / 8 / 32: {costs}")
    for name, check in result["targets"].items():
        print(f"{name:40s} {check['value']:>8} (target {check['target']}): {'met' if check['met'] else 'NOT MET'}")


if __name__ == "__main__":
    main()
