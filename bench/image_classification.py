"""Benchmark: the CNN and MLP baselines on MNIST with the image-classification recipe, on this machine.

    python bench/image_classification.py                 # both, the shipped configs (mnist_cnn.yaml, mnist_mlp.yaml)
    python bench/image_classification.py --models cnn resnet --threads 1

Each model trains for its config's fixed number of epochs on the 60,000 MNIST training images
(../shared/data/mnist/mnist.npz) in its own subprocess, as a user runs the recipe; the saved model (the last epoch's:
the configs do not pick an epoch by test accuracy) is then reloaded and scored on the 10,000 test images, fed by the
torch-free preprocessing that serving uses. Rows: test accuracy (target: CNN >= 99.3%, MLP >= 98.0%), training
samples/s, wall time (target: within 15 minutes each), inference images/s (batch 256) and batch-1 latency,
parameter count, peak RSS. Prints a table and writes JSON (default bench/results/image_classification.json); the
machine's load average is recorded, since other work on a shared machine slows every figure here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import REPO, machine, run_measured, write_result

MODELS = {  # name -> (shipped config, test-accuracy target)
    "cnn": ("recipes/configs/image_classification/mnist_cnn.yaml", 0.993),
    "mlp": ("recipes/configs/image_classification/mnist_mlp.yaml", 0.980),
    "resnet": ("recipes/configs/image_classification/resnet_small.yaml", 0.993),  # optional: --models resnet
}
WALL_TARGET_SECONDS = 15 * 60


def train(name: str, args: argparse.Namespace, out: Path) -> dict:
    config, _ = MODELS[name]
    cmd = [sys.executable, "recipes/image_classification.py", "--config", config, f"data.train={args.data}",
           f"train.output_dir={out}", "train.overwrite=true", f"train.seed={args.seed}"]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    wall, rss = run_measured(cmd, out.with_suffix(".log"), env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"model": name, "config": config, "epochs": metrics["train"]["epochs_completed"],
            "train_samples_per_second": metrics["train"]["samples_per_second"],
            "train_seconds": metrics["train"]["seconds_this_session"], "wall_seconds": round(wall, 1),
            "peak_rss_mib": round(rss), "run_accuracy": metrics["eval"]["accuracy"]}


def score(model_dir: Path, data: str, batch_size: int) -> dict:
    """Test accuracy of the saved model, inference images/s at `batch_size` and batch-1 latency (eval mode)."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageClassification

    import finetune.vision.architectures  # noqa: F401  (registers the baselines)
    from serve.bundle.preprocessing import PreprocessingSpec, preprocess_batch

    task = json.loads((model_dir / "tuneforge.json").read_text())
    arrays = np.load(data)
    spec = PreprocessingSpec.from_dict(task["preprocessing"])
    pixel_values = torch.from_numpy(preprocess_batch(arrays["x_test"], spec))
    labels = torch.from_numpy(arrays["y_test"].astype(np.int64))
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        model(pixel_values[:batch_size])  # warm-up
        passes = []
        for _ in range(3):
            start, predictions = time.perf_counter(), []
            for i in range(0, len(pixel_values), batch_size):
                predictions.append(model(pixel_values[i:i + batch_size]).logits.argmax(-1))
            passes.append(time.perf_counter() - start)
        latencies = []
        for i in range(200):
            start = time.perf_counter()
            model(pixel_values[i:i + 1])
            latencies.append((time.perf_counter() - start) * 1000)
    accuracy = (torch.cat(predictions) == labels).float().mean().item()
    return {"test_accuracy": round(accuracy, 4), "inference_images_per_second": round(len(labels) / min(passes), 1),
            "latency_ms_batch1_p50": round(statistics.median(latencies), 3),
            "num_parameters": task["num_parameters"], "architecture": task["architecture"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/mnist/mnist.npz"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["cnn", "mlp"])
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for training and inference (default: torch's, one per core)")
    parser.add_argument("--inference-batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", default=str(REPO / "runs/bench_image_classification"))
    parser.add_argument("--out", default=str(REPO / "bench/results/image_classification.json"))
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start_machine = machine()
    rows = []
    for name in args.models:
        row = train(name, args, work / name)
        row.update(score(work / name / "model", args.data, args.inference_batch_size))
        target = MODELS[name][1]
        row["accuracy_target"] = target
        row["accuracy_target_met"] = row["test_accuracy"] >= target
        row["within_15_minutes"] = row["wall_seconds"] <= WALL_TARGET_SECONDS
        rows.append(row)

    result = {"benchmark": "image_classification", "data": "MNIST (60,000 train / 10,000 test)",
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
              "machine": start_machine, "load_average_at_end": machine()["load_average_1_5_15min"], "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)

    m = result["machine"]
    print(f"\nMNIST baselines on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
          f"load average {m['load_average_1_5_15min'][0]} at start, {result['load_average_at_end'][0]} at end)")
    print(f"{'model':<6} {'params':>8} {'epochs':>6} {'test acc':>9} {'target':>7} {'train img/s':>12} "
          f"{'wall s':>7} {'infer img/s':>12} {'b1 p50 ms':>10} {'RSS MiB':>8}")
    for r in rows:
        met = "ok" if r["accuracy_target_met"] else "MISS"
        print(f"{r['model']:<6} {r['num_parameters']:>8,} {r['epochs']:>6} {r['test_accuracy']:>9.4f} "
              f"{met:>7} {r['train_samples_per_second']:>12.1f} {r['wall_seconds']:>7.0f} "
              f"{r['inference_images_per_second']:>12.1f} {r['latency_ms_batch1_p50']:>10.3f} {r['peak_rss_mib']:>8}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
