"""Benchmark: the text-classification recipe against a plain Hugging Face Trainer on SST-2, side by side.

    python bench/text_classification.py                 # 4,000 SST-2 sentences, 1 epoch, 3 seeds (15 min, 2 cores)
    python bench/text_classification.py --full          # the recipe on all 60,614 sentences (sst2.yaml), no Trainer

Same model (all-MiniLM-L6-v2), data subset, tokenization, batch size, max_length, epochs, learning rate, schedule
and seeds (one run of each per seed: a single seed's test accuracy moves by about a point with the data order, so
the table compares means). Each run is its own subprocess (its peak RSS is measured alone); each saved model is
then scored on the 872-sentence SST-2 test split by the same code. Rows: the recipe, a plain Trainer, and a
Trainer with `train_sampling_strategy="group_by_length"` (to show how much of the gap is length grouping).
Prints a table and writes JSON (default bench/results/text_classification.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, run_measured, write_result

from finetune.config import yaml_load
from finetune.tracking import read_metrics_log

RECIPE_CONFIG = REPO / "recipes/configs/text_classification/sst2.yaml"


def recipe_run(args: argparse.Namespace, out: Path) -> dict:
    overrides = [f"train.output_dir={out}", "train.overwrite=true", f"train.seed={args.seed}",
                 f"data.train={args.data}/train.tsv"]
    if not args.full:
        overrides += [f"data.max_train_samples={args.train_samples}", f"train.epochs={args.epochs}",
                      f"train.batch_size={args.batch_size}", f"data.max_length={args.max_length}",
                      f"optim.lr={args.lr}", f"optim.warmup_ratio={args.warmup_ratio}",
                      # one evaluation at the end, on dev; the test split is scored below, by the same code for all
                      f"data.eval={args.data}/dev.tsv", "data.max_eval_samples=872", "train.eval_every_n_steps=0",
                      "checkpoint.every_n_steps=0", "checkpoint.at_epoch_end=false", "early_stopping.patience=0"]
    cmd = [sys.executable, "recipes/text_classification.py", "--config", str(RECIPE_CONFIG), *overrides, *args.set]
    wall, rss = run_measured(cmd, out.with_suffix(".log"))
    train = json.loads((out / "metrics.json").read_text())["train"]
    config = yaml_load((out / "config.yaml").read_text())
    evals = [{k: row[k] for k in ("step", "eval_loss", "accuracy")}  # the dev evaluations
             for row in read_metrics_log(out) if "accuracy" in row]
    return {"name": "tuneforge recipe", "samples_per_second": train["samples_per_second"],
            "train_seconds": train["seconds_this_session"], "samples": train["samples"], "wall_seconds": wall,
            "peak_rss_mib": rss, "model_dir": str(out / "model"),
            "recipe_settings": {"lr": config["optim"]["lr"], "epochs": config["train"]["epochs"],
                                "batch_size": config["train"]["batch_size"],
                                "max_length": config["data"]["max_length"]},
            "dev_evals": evals}


def trainer_run(args: argparse.Namespace, out: Path, grouped: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker-trainer", str(out), "--data", args.data, "--seed", str(args.seed),
           "--train-samples", str(args.train_samples), "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(args.lr), "--warmup-ratio",
           str(args.warmup_ratio), *(["--grouped"] if grouped else [])]
    wall, rss = run_measured(cmd, out.with_suffix(".log"))
    result = json.loads((out / "trainer_result.json").read_text())
    return {"name": "HF Trainer" + (" (group_by_length)" if grouped else ""), **result, "wall_seconds": wall,
            "peak_rss_mib": rss, "model_dir": str(out / "model")}


def trainer_worker(args: argparse.Namespace) -> None:
    """A plain Trainer on the same tokenized data (built by the same finetune.data code) and the same model."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from finetune.models import ModelConfig, build_tokenizer
    from finetune.text.data import TextDataConfig, encode_labels, load_raw_splits, tokenize_splits
    from finetune.text.models import build_sequence_classifier

    out = Path(args.worker_trainer)
    data_cfg = TextDataConfig(train=f"{args.data}/train.tsv", eval=f"{args.data}/dev.tsv", text_column="sentence",
                              label_names=["negative", "positive"], max_length=args.max_length,
                              max_train_samples=args.train_samples)
    model_cfg = ModelConfig()
    tokenizer = build_tokenizer(model_cfg)
    labelled, names = encode_labels(load_raw_splits(data_cfg, seed=args.seed), data_cfg, regression=False)
    train = tokenize_splits(labelled, tokenizer, data_cfg)["train"]  # Trainer drops "length" (used for grouping)
    model = build_sequence_classifier(model_cfg, label_names=names, problem_type="single_label_classification")
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=args.warmup_ratio, lr_scheduler_type="linear",
        max_grad_norm=1.0, seed=args.seed, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=50, use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if args.grouped else "random")
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer)
    metrics = trainer.train().metrics
    trainer.save_model(str(out / "model"))
    (out / "trainer_result.json").write_text(json.dumps({
        "samples_per_second": metrics["train_samples_per_second"], "train_seconds": metrics["train_runtime"],
        "samples": len(train) * args.epochs}))


def test_accuracy(model_dir: str, test_tsv: str) -> float:
    """Accuracy of a saved classifier on the SST-2 test split, batched by length, no padding effects."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sentences, labels = [], []
    for line in Path(test_tsv).read_text().splitlines()[1:]:
        text, label = line.rsplit("\t", 1)
        sentences.append(text)
        labels.append(int(label))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(sentences), 64):
            enc = tokenizer(sentences[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            correct += (model(**enc).logits.argmax(-1) == torch.tensor(labels[i:i + 64])).sum().item()
    return correct / len(sentences)


def checkpoint_test_accuracies(run_dir: Path, test_tsv: str) -> dict[str, float]:
    """Test accuracy of each checkpoint the run kept (keep_last), a diagnostic only: the model is selected on dev.
    Shows whether a checkpoint other than the selected one would have scored better on test."""
    scores = {}
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1])):
        with tempfile.TemporaryDirectory() as tmp:  # the saved model's config and tokenizer, the checkpoint's weights
            for file in (run_dir / "model").iterdir():
                shutil.copy(checkpoint / file.name if file.name == "model.safetensors" else file, Path(tmp) / file.name)
            scores[checkpoint.name] = test_accuracy(tmp, test_tsv)
    return scores


def summarize(runs: list[dict]) -> list[dict]:
    """One row per run name, in first-seen order: mean throughput, time and memory; test accuracy mean, std, all."""
    rows = []
    for name in dict.fromkeys(run["name"] for run in runs):
        group = [run for run in runs if run["name"] == name]
        accuracies = [run["test_accuracy"] for run in group]
        rows.append({"name": name, "seeds": [run["seed"] for run in group],
                     **{key: round(statistics.fmean(run[key] for run in group), 3)
                        for key in ("samples_per_second", "train_seconds", "wall_seconds", "peak_rss_mib")},
                     "test_accuracy_mean": round(statistics.fmean(accuracies), 4),
                     "test_accuracy_std": round(statistics.pstdev(accuracies), 4), "test_accuracies": accuracies})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/sst2"))
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="each run once per seed (data order, head init); the table shows means "
                             "(default 42 43 44; 42 with --full)")
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)  # a Trainer worker's own seed
    parser.add_argument("--full", action="store_true", help="the recipe alone on all data with sst2.yaml")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra recipe overrides, e.g. --full --set optim.lr=1e-4 train.epochs=2")
    parser.add_argument("--no-grouped-trainer", action="store_true", help="skip the group_by_length Trainer row")
    parser.add_argument("--work-dir", default=str(REPO / "runs/bench_text_classification"))
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/text_classification[_full].json)")
    parser.add_argument("--worker-trainer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--grouped", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_trainer:
        return trainer_worker(args)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    args.seeds = args.seeds or ([42] if args.full else [42, 43, 44])
    runs = []  # one row per run and seed; the table shows their means
    for seed in args.seeds:
        args.seed = seed
        tag = "" if len(args.seeds) == 1 else f"_seed{seed}"
        seed_runs = [recipe_run(args, work / (("recipe_full" if args.full else "recipe") + tag))]
        if not args.full:
            seed_runs.append(trainer_run(args, work / f"trainer{tag}", grouped=False))
            if not args.no_grouped_trainer:
                seed_runs.append(trainer_run(args, work / f"trainer_grouped{tag}", grouped=True))
        for run in seed_runs:
            run["seed"] = seed
            model_dir, test_tsv = Path(run.pop("model_dir")), f"{args.data}/test.tsv"
            run["test_accuracy"] = test_accuracy(str(model_dir), test_tsv)
            if args.full:
                run["checkpoint_test_accuracies"] = checkpoint_test_accuracies(model_dir.parent, test_tsv)
        runs += seed_runs
    rows = summarize(runs)
    base = next((r for r in rows if r["name"] == "HF Trainer"), None)
    for row in rows:
        row["speedup_vs_trainer"] = round(row["samples_per_second"] / base["samples_per_second"], 3) if base else None
    recipe = rows[0]
    if base:  # the recipe at >= 1.3x the Trainer's samples/s, its mean test accuracy no lower
        targets = {"speedup_vs_trainer_at_least": 1.3, "met": recipe["speedup_vs_trainer"] >= 1.3
                   and recipe["test_accuracy_mean"] >= base["test_accuracy_mean"]}
    else:
        targets = {"test_accuracy_at_least": 0.915, "met": recipe["test_accuracy_mean"] >= 0.915}

    settings = {k: v for k, v in vars(args).items()
                if k not in ("worker_trainer", "grouped", "out", "work_dir", "seed")}
    result = {"benchmark": "text_classification", "settings": settings, "machine": machine(), "rows": rows,
              "targets": targets, "runs": runs}
    out = Path(args.out or REPO / f"bench/results/text_classification{'_full' if args.full else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)

    print(f"\nSST-2, all-MiniLM-L6-v2, {'all data' if args.full else f'{args.train_samples} sentences'}, "
          f"on {result['machine']['cpu']} ({result['machine']['cores']} cores)")
    print(f"means over seeds {', '.join(map(str, args.seeds))}")
    print(f"{'run':<30} {'samples/s':>10} {'x Trainer':>10} {'test acc':>9} {'(std)':>7} {'train s':>8} "
          f"{'peak RSS MiB':>13}")
    for r in rows:
        speed = f"{r['speedup_vs_trainer']:.2f}" if r["speedup_vs_trainer"] else "-"
        print(f"{r['name']:<30} {r['samples_per_second']:>10.1f} {speed:>10} {r['test_accuracy_mean']:>9.4f} "
              f"{r['test_accuracy_std']:>7.4f} {r['train_seconds']:>8.1f} {r['peak_rss_mib']:>13.0f}")
    print(f"\ntargets met: {targets['met']}; wrote {out}")


if __name__ == "__main__":
    main()
