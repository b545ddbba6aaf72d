"""Benchmark: explanations from the bundle (serve.explain) on the main job's text bundle and an MNIST CNN bundle.

    python bench/explain.py --build     # fine-tune + compress both into --work first (CPU minutes), then measure
    python bench/explain.py --text-bundle bundles/text_default --image-bundle bundles/mnist_cnn \
        [--text-run runs/text_classification/default --image-run runs/image_classification/mnist_cnn]

The text bundle is the README quickstart's (all-MiniLM-L6-v2 fine-tuned on the embedded reviews; its int8-dynamic
variant is explained); --build makes it with the shipped default.yaml and a short compress config (export + dynamic
int8, no PyTorch baselines). The image bundle is the MNIST CNN of recipes/configs/image_classification/mnist_cnn.yaml
(--build: --mnist-epochs of it, default 1 rather than 8, to save CPU time; the JSON says so), explained on its default
variant. Inputs: --texts 30-word reviews (two test reviews of one sentiment joined and cut at 30 words) and --images
MNIST test digits.

Per method (text: occlusion, shap; images: occlusion, rise; plus integrated gradients through PyTorch when the run
directories are given and captum is installed): the mean deletion and insertion AUC of p(predicted label) against the
mean over --seeds random orders (serve.explain.deletion_insertion, the bundle's graph scoring every curve), how often
the method beats random on deletion, the median time per explanation and its model calls, and the mean Spearman rank
correlation of attributions between each pair of methods. On a shared machine, "vs predict" (the median over inputs of
the explanation's time over a plain prediction of the same input timed just before it) is the steadier figure.
Targets: every method's deletion AUC below random's on both tasks; a text explanation (occlusion) of the int8 bundle
under 100 ms for a 30-word review at --threads 2.
Prints a table; writes JSON (default bench/results/explain.json) with the machine and its load average (the machine
may be shared: every time here is slower then). No absolute paths are recorded.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, machine, run_measured, write_result

sys.path.insert(0, str(REPO))

from serve import runtime
from serve.explain import IMAGE_METHODS, TEXT_METHODS, deletion_insertion, explain

TEXT_TARGET_MS = 100.0
REVIEW_WORDS = 30
COMPRESS_YAML = """run_dir: {run}
out: {out}
overwrite: true
stages:
  - export: {{}}
{quantize}
latency:
  threads: 1
  batch_sizes: [1]
  warmup: 2
  runs: 20
  rounds: 2
default_variant: fastest
"""
TEXT_QUANTIZE = "  - quantize: {name: int8-dynamic, method: dynamic}"
IMAGE_QUANTIZE = ("  - quantize: {name: int8-static, method: static, per_channel: true, calibration_method: minmax, "
                  "calibration_samples: 256}")


def build(args: argparse.Namespace) -> dict:
    """Fine-tune and compress both models into args.work; returns what was built and how long it took."""
    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    done: dict = {}
    text_run, image_run = work / "runs" / "text", work / "runs" / "mnist_cnn"
    jobs = [
        ("text_train", [sys.executable, "recipes/text_classification.py", "--config",
                        "recipes/configs/text_classification/default.yaml", f"train.output_dir={text_run}",
                        "train.overwrite=true"]),
        ("image_train", [sys.executable, "recipes/image_classification.py", "--config",
                         "recipes/configs/image_classification/mnist_cnn.yaml", f"data.train={args.mnist}",
                         f"train.output_dir={image_run}", "train.overwrite=true", f"train.epochs={args.mnist_epochs}"]),
    ]
    for name, quantize, run in (("text", TEXT_QUANTIZE, text_run), ("mnist_cnn", IMAGE_QUANTIZE, image_run)):
        config = work / f"compress_{name}.yaml"
        config.write_text(COMPRESS_YAML.format(run=run, out=work / "bundles" / name, quantize=quantize))
        jobs.append((f"{name}_compress", [sys.executable, "-m", "compress", "run", "--config", str(config)]))
    for name, cmd in jobs:
        print(f"build: {name} ...", flush=True)
        wall, _ = run_measured(cmd, work / "logs" / f"{name}.log")
        done[name] = {"seconds": round(wall, 1)}
    args.text_bundle, args.image_bundle = work / "bundles" / "text", work / "bundles" / "mnist_cnn"
    args.text_run, args.image_run = text_run, image_run
    done["mnist_epochs"] = args.mnist_epochs
    return done


def reviews(count: int) -> list[str]:
    """`count` reviews of REVIEW_WORDS words: test reviews of one sentiment joined in pairs and cut."""
    with open(REPO / "finetune" / "datasets" / "reviews" / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["sentiment"], []).append(row["text"])
    for texts in itertools.cycle(by_label.values()):
        i = len(out) // len(by_label)
        words = f"{texts[2 * i % len(texts)]} {texts[(2 * i + 1) % len(texts)]}".split()
        out.append(" ".join((words * 2)[:REVIEW_WORDS]))
        if len(out) == count:
            return out
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel()))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(predictor, inputs: list, methods: list[str], args: argparse.Namespace, gradient=None) -> dict:
    """Per method: AUCs vs random, wins, time and calls; and the rank correlation between methods."""
    rows, attributions = {}, {}
    all_methods = methods + (["integrated-gradients"] if gradient is not None else [])
    for method in all_methods:
        deletion, insertion, r_deletion, r_insertion, times, calls, wins = [], [], [], [], [], [], 0
        ratios: list[float] = []
        attributions[method] = []
        warm = gradient.explain(inputs[0], steps=2) if method == "integrated-gradients" else explain(  # noqa: F841
            predictor, inputs[0], method=method, seed=args.seed)  # first-call allocations are not timed
        for item in inputs:
            start = time.perf_counter()  # a plain prediction of the same input just before: the yardstick
            predictor.predict([item])
            ratios.append(time.perf_counter() - start)
            start = time.perf_counter()
            if method == "integrated-gradients":
                why = gradient.explain(item, steps=args.ig_steps)
                calls.append(why.steps)
            else:
                why = explain(predictor, item, method=method, seed=args.seed)
                calls.append(why.model_calls)
            times.append((time.perf_counter() - start) * 1000)
            ratios[-1] = times[-1] / 1000 / ratios[-1]
            result = deletion_insertion(predictor, item, why.attributions, target=why.target_index, seeds=args.seeds,
                                        steps=args.steps)
            deletion.append(result.deletion_auc)
            insertion.append(result.insertion_auc)
            r_deletion.append(result.random_deletion_auc)
            r_insertion.append(result.random_insertion_auc)
            wins += result.deletion_auc < result.random_deletion_auc
            attributions[method].append(np.asarray(why.attributions))
        rows[method] = {"deletion_auc": float(np.mean(deletion)), "random_deletion_auc": float(np.mean(r_deletion)),
                        "insertion_auc": float(np.mean(insertion)),
                        "random_insertion_auc": float(np.mean(r_insertion)),
                        "beats_random_deletion": bool(np.mean(deletion) < np.mean(r_deletion)),
                        "deletion_wins": f"{wins}/{len(inputs)}", "median_ms": statistics.median(times),
                        "p90_ms": float(np.percentile(times, 90)), "model_calls": statistics.median(calls),
                        "times_one_prediction": statistics.median(ratios),
                        "runtime": "PyTorch (run directory)" if method == "integrated-gradients" else "ONNX Runtime"}
    agreement = {}
    for a, b in itertools.combinations(all_methods, 2):
        values = [spearman(x, y) for x, y in zip(attributions[a], attributions[b], strict=True)]
        agreement[f"{a} vs {b}"] = float(np.nanmean(values))
    return {"methods": rows, "rank_correlation": agreement, "inputs": len(inputs)}


def gradient_explainer(run: Path | None):
    if run is None:
        return None
    from compress.attribution import GradientExplainer, captum_available

    if not captum_available():
        print("captum is not installed: integrated gradients skipped (pip install 'tuneforge[explain]')")
        return None
    import torch

    torch.set_num_threads(1)
    return GradientExplainer.from_run(run)


def print_table(task: str, result: dict) -> None:
    print(f"\n{task} ({result['inputs']} inputs; variant {result['variant']})")
    print(f"{'method':22} {'deletion AUC':>12} {'random':>8} {'insertion AUC':>14} {'random':>8} {'del. wins':>10} "
          f"{'median ms':>10} {'calls':>6} {'vs predict':>10}")
    for method, row in result["methods"].items():
        print(f"{method:22} {row['deletion_auc']:12.3f} {row['random_deletion_auc']:8.3f} {row['insertion_auc']:14.3f} "
              f"{row['random_insertion_auc']:8.3f} {row['deletion_wins']:>10} {row['median_ms']:10.1f} "
              f"{row['model_calls']:6.0f} {row['times_one_prediction']:9.1f}x")
    for pair, rho in result["rank_correlation"].items():
        print(f"  Spearman {pair}: {rho:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-bundle", type=Path)
    parser.add_argument("--image-bundle", type=Path)
    parser.add_argument("--text-run", type=Path, help="its run directory (integrated gradients; optional)")
    parser.add_argument("--image-run", type=Path)
    parser.add_argument("--build", action="store_true", help="fine-tune and compress both bundles into --work first")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuneforge-bench-explain"))
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist" / "mnist.npz")
    parser.add_argument("--mnist-epochs", type=int, default=1)
    parser.add_argument("--text-variant", default="int8-dynamic")
    parser.add_argument("--image-variant", default=None, help="default: the bundle's default variant")
    parser.add_argument("--texts", type=int, default=20)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--seeds", type=int, default=3, help="random orders per faithfulness reference")
    parser.add_argument("--steps", type=int, default=None, help="curve points (default: per word; 20 for images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. 'machine shared with other work')")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "explain.json")
    args = parser.parse_args()
    built = build(args) if args.build else None
    if not args.text_bundle or not args.image_bundle:
        sys.exit("pass --text-bundle and --image-bundle, or --build")

    report: dict = {"machine": machine(), "threads": args.threads, "seeds": args.seeds, "seed": args.seed,
                    "note": args.note, "built": built, "tasks": {}}
    text_model = runtime.load(args.text_bundle, args.text_variant, threads=args.threads)
    texts = reviews(args.texts)
    result = measure(text_model, texts, list(TEXT_METHODS), args, gradient_explainer(args.text_run))
    result.update(variant=args.text_variant, bundle=args.text_bundle.name, review_words=REVIEW_WORDS,
                  target_ms=TEXT_TARGET_MS,
                  meets_time_target=result["methods"]["occlusion"]["median_ms"] < TEXT_TARGET_MS)
    report["tasks"]["text"] = result
    print_table("text: reviews", result)

    image_model = runtime.load(args.image_bundle, args.image_variant, threads=args.threads)
    digits = list(np.load(args.mnist)["x_test"][:args.images])
    result = measure(image_model, digits, list(IMAGE_METHODS), args, gradient_explainer(args.image_run))
    result.update(variant=image_model.name.split("/")[-1], bundle=args.image_bundle.name)
    report["tasks"]["image"] = result
    print_table("image: MNIST", result)

    every = all(row["beats_random_deletion"] for task in report["tasks"].values()
                for row in task["methods"].values())
    report["targets"] = {"every_method_beats_random_deletion": every,
                         "text_occlusion_under_100ms": report["tasks"]["text"]["meets_time_target"]}
    report["load_average_at_end_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\ntargets: {report['targets']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, report)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
