"""Benchmark: structured pruning (with recovery) and distillation of a MiniLM SST-2 run: accuracy, size, latency.

    python bench/prune_distill.py                        # trains the teacher first (4,000 SST-2 sentences)
    python bench/prune_distill.py --teacher runs/sst2    # an existing SST-2 text-classification run
    python bench/prune_distill.py --teacher T --pruned P --distilled D    # measure existing runs only

Rows: the teacher (all-MiniLM-L6-v2 fine-tuned by recipes/text_classification.py), the pruned model
(compress.prune.prune_run: --heads / --ffn of each layer's attention heads and FFN neurons removed by gradient
importance, then a recovery fine-tune by the text recipe) and the distilled student (compress.distill.distill_run
with recipes/configs/distill/sst2.yaml: 3 of the 6 layers, knowledge distillation). Each run is exported by
compress.bundle.export_bundle (fp32 and ONNX Runtime-optimized graphs, parity-gated). Accuracy: the 872-sentence
SST-2 test split (the runs' eval split). Latency: p50 / p95 of PyTorch eager and of ONNX Runtime on real test
sentences at batch 1 and 8, --threads threads, measured side by side in this process. Targets (issue 5): pruned
accuracy drop <= 1 point with a measured speedup; student >= 97% of the teacher's accuracy.
Prints a table and writes JSON (default bench/results/prune_distill.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, machine, run_measured, write_result

from compress.training import ScriptTrainer

TEXT_CONFIG = REPO / "recipes/configs/text_classification/sst2.yaml"
DISTILL_CONFIG = REPO / "recipes/configs/distill/sst2.yaml"
TRAINER = ScriptTrainer(REPO / "recipes")  # recovery and distillation run this checkout's recipes


def train_teacher(args: argparse.Namespace, out: Path) -> float:
    """The text recipe on a 4,000-sentence subset, evaluated on the test split; returns wall seconds."""
    cmd = [sys.executable, "recipes/text_classification.py", "--config", str(TEXT_CONFIG),
           f"train.output_dir={out}", "train.overwrite=true", f"data.train={args.data}/train.tsv",
           f"data.eval={args.data}/test.tsv", f"data.max_train_samples={args.train_samples}",
           "optim.lr=5.0e-5", f"train.epochs={args.epochs}", "train.eval_every_n_steps=0", "checkpoint.every_n_steps=0",
           "early_stopping.patience=0"]
    wall, _ = run_measured(cmd, out.with_suffix(".log"))
    return wall


def time_calls(fn, inputs: list, repeats: int) -> dict[str, float]:
    """p50 / p95 milliseconds of fn(x) over `repeats` passes through `inputs`, after a warm-up."""
    for x in inputs[:5]:
        fn(x)
    times = []
    for _ in range(repeats):
        for x in inputs:
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def measure(name: str, run: Path, bundle: Path, sentences: list[str], args: argparse.Namespace) -> dict:
    """Accuracy, parameters, graph sizes and latencies of one run (exported to `bundle` first)."""
    import torch

    from compress.bundle import ExportConfig, export_bundle
    from compress.parity import open_session
    from compress.source import load_model, read_run
    from serve.bundle.inputs import encode_texts
    from serve.bundle.manifest import read_manifest

    torch.set_num_threads(args.threads)
    meta = json.loads((run / "model" / "tuneforge.json").read_text())
    export_bundle(run, bundle, config=ExportConfig(optimize=True), overwrite=True)
    manifest = read_manifest(bundle, verify=False)
    model = load_model(read_run(run))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    names = [i["name"] for i in manifest.variants["fp32"]["graphs"]["model"]["inputs"]]
    batches = {1: [sentences[i:i + 1] for i in range(args.samples)],
               8: [sentences[i:i + 8] for i in range(0, 8 * args.samples // 4, 8)]}
    row = {"name": name, "run": str(run), "accuracy": meta["eval"]["accuracy"],
           "parameters": sum(p.numel() for p in model.parameters()),
           "onnx_fp32_mb": round(manifest.variants["fp32"]["size_bytes"] / 1e6, 2),
           "parity_max_abs_diff": max(v["parity"]["max_abs_diff"] for v in manifest.variants.values()),
           "onnx_accuracy": manifest.variants["optimized"]["metrics"]["accuracy"], "latency": {}}
    sessions = {f"onnx {v}": open_session(manifest.graph_path(v), threads=args.threads)
                for v in ("fp32", "optimized")}
    for batch, texts in batches.items():
        feeds = [encode_texts(tokenizer, t, input_names=names) for t in texts]
        tensors = [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds]
        with torch.inference_mode():
            row["latency"][f"torch b{batch}"] = time_calls(lambda x: model(**x), tensors, args.repeats)
        for label, session in sessions.items():
            row["latency"][f"{label} b{batch}"] = time_calls(lambda x, s=session: s.run(None, x), feeds, args.repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/sst2"))
    parser.add_argument("--teacher", default=None, help="an SST-2 text-classification run (default: train one)")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pruned", default=None, help="an existing pruned run (default: prune the teacher)")
    parser.add_argument("--distilled", default=None, help="an existing distilled run (default: distil the teacher)")
    parser.add_argument("--heads", type=float, default=0.35, help="share of each layer's heads to remove")
    parser.add_argument("--ffn", type=float, default=0.35, help="share of each layer's FFN neurons to remove")
    parser.add_argument("--recovery-steps", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=100, help="test sentences timed at batch 1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", default=str(REPO / "runs/bench_prune_distill"))
    parser.add_argument("--out", default=str(REPO / "bench/results/prune_distill.json"))
    args = parser.parse_args()

    from compress.distill import DistillConfig, distill_run
    from compress.prune import PruneConfig, prune_run

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    walls = {}
    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    if not args.teacher:
        walls["teacher"] = train_teacher(args, teacher)
    pruned, student = Path(args.pruned or work / "pruned"), Path(args.distilled or work / "distilled")
    if not args.pruned:
        start = time.perf_counter()
        prune_run(teacher, pruned, overwrite=True, trainer=TRAINER, config=PruneConfig(
            heads=args.heads, ffn=args.ffn, recovery_steps=args.recovery_steps))
        walls["pruned"] = time.perf_counter() - start
    if not args.distilled:
        start = time.perf_counter()
        distill_run(teacher, student, overwrite=True, trainer=TRAINER,
                    config=DistillConfig(config_file=str(DISTILL_CONFIG)))
        walls["distilled"] = time.perf_counter() - start

    sentences = [line.rsplit("\t", 1)[0] for line in Path(f"{args.data}/test.tsv").read_text().splitlines()[1:]]
    rows = []
    for name, run in (("teacher", teacher), ("pruned", pruned), ("distilled", student)):
        rows.append({**measure(name, run, work / f"bundle_{name}", sentences, args),
                     "make_seconds": round(walls[name], 1) if name in walls else None})
    base = rows[0]
    for row in rows:
        row["accuracy_delta_points"] = round(100 * (row["accuracy"] - base["accuracy"]), 2)
        row["accuracy_vs_teacher"] = round(row["accuracy"] / base["accuracy"], 4)
        row["speedup"] = {k: round(base["latency"][k]["p50_ms"] / v["p50_ms"], 3) for k, v in row["latency"].items()}
    pruning = json.loads((pruned / "model" / "tuneforge.json").read_text())["pruning"]
    distillation = json.loads((student / "model" / "tuneforge.json").read_text())["distillation"]
    result = {"benchmark": "prune_distill", "settings": vars(args), "machine": machine(),
              "pruning": {k: pruning[k] for k in ("units", "parameters_before", "parameters_after", "recovery_steps")},
              "distillation": {k: distillation[k] for k in ("student", "alpha", "temperature", "cache_teacher_logits")},
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)

    print(f"\nSST-2 (test, 872 sentences), all-MiniLM-L6-v2 teacher; {args.threads} thread(s) on "
          f"{result['machine']['cpu']}")
    keys = list(base["latency"])
    print(f"{'model':<10} {'acc':>7} {'delta':>6} {'params':>10} {'MB':>6}  " + "  ".join(f"{k:>17}" for k in keys))
    for r in rows:
        lat = "  ".join(f"{r['latency'][k]['p50_ms']:>8.2f} ({r['speedup'][k]:.2f}x)" for k in keys)
        print(f"{r['name']:<10} {r['accuracy']:>7.4f} {r['accuracy_delta_points']:>+6.2f} {r['parameters']:>10,} "
              f"{r['onnx_fp32_mb']:>6.1f}  {lat}")
    print(f"(p50 ms at batch b1 / b8, speedup vs the teacher)\nwrote {out}")


if __name__ == "__main__":
    main()
