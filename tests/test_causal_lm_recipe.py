"""The causal-LM recipe run as users run it: a subprocess, the shipped YAML, tiny models and data, tiny overrides."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LM_TEXT, REPO, run_recipe
from safetensors.torch import load_file

DEFAULT_YAML = "recipes/configs/causal_lm/default.yaml"
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lm_data")
    (folder / "story.txt").write_text(LM_TEXT * 3)
    pairs = [{"prompt": f"Finish: the quick brown {w}", "response": f"{w} jumps over the lazy dog."}
             for w in ("fox", "cat", "dog", "bird", "model", "story", "line", "top", "stop", "word", "next", "small")]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs * 2))
    return {"text": folder / "story.txt", "instruction": folder / "pairs.jsonl"}


def tiny_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The shipped default config pointed at a tiny model and text; small blocks and batches, fast settings."""
    return ["--config", DEFAULT_YAML, f"model.name_or_path={model}", f"data.train={data}", "data.format=text",
            "data.block_size=32", "data.eval_fraction=0.15", f"train.output_dir={out}", "train.batch_size=4",
            "train.eval_batch_size=3", "train.epochs=4", "train.log_every_n_steps=1", "train.eval_every_n_steps=0",
            "optim.lr=3.0e-3", "optim.warmup_ratio=0.0", "generation.prompts=[The quick brown]",
            "generation.max_new_tokens=12", *extra]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def direct_eval_loss(run_dir: Path, data: Path) -> tuple[float, int]:
    """Mean cross-entropy per predicted token of model/ over the held-out blocks, one block at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(run_dir / "model"), AutoTokenizer.from_pretrained(
        run_dir / "model")
    stream = [*tokenizer(data.read_text())["input_ids"], tokenizer.eos_token_id]
    blocks = [stream[i:i + 32] for i in range(0, len(stream) - 31, 32)]
    held_out = blocks[-round(0.15 * len(blocks)):]
    total, count = 0.0, 0
    with torch.no_grad():
        for block in held_out:
            ids = torch.tensor([block])
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(block) - 1
    return total / count, count


@pytest.fixture(scope="module")
def gpt2_run(tiny_gpt2, lm_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """One uninterrupted run: checked end to end, and the reference for the resumed run."""
    out = tmp_path_factory.mktemp("gpt2") / "run"
    extra = ["checkpoint.every_n_steps=5", "checkpoint.keep_last=3"]
    run_recipe("causal_lm", *tiny_args(tiny_gpt2, lm_data["text"], out, *extra))
    return out, extra


def test_text_run_learns_and_writes_a_complete_run_dir(gpt2_run, tiny_gpt2, lm_data):
    out, _ = gpt2_run
    for name in ("config.yaml", "metrics.json", "curves.png", "samples.md", "logs/metrics.jsonl", "logs/train.log",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/tuneforge.json"):
        assert (out / name).is_file(), f"{name} missing from the run directory"
    assert not list((out / "model").glob("*.bin")), "weights must be safetensors only"

    losses = [e["train_loss"] for e in read_log(out) if "train_loss" in e]
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["train"]["steps"]
    assert len(losses) == steps >= 12
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3]), f"training loss did not go down: {losses}"

    # Perplexity is exp of the mean loss per held-out token, as a direct computation from model/ finds it.
    expected_loss, tokens = direct_eval_loss(out, lm_data["text"])
    saved = metrics["eval"]
    assert saved["num_tokens"] == tokens
    assert saved["eval_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert saved["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-4)

    task = json.loads((out / "model" / "tuneforge.json").read_text())
    assert task["task"] == "causal-lm" and task["block_size"] == 32 and task["chat_template"] is False
    assert task["base_model"] == str(tiny_gpt2)
    assert set(task["generation"]) == {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                                       "do_sample"}
    assert task["eval"] == saved and task["step"] == metrics["model_step"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "model").pad_token == "<|endoftext|>"  # GPT-2 style: EOS pads

    samples = (out / "samples.md").read_text()
    assert "The quick brown" in samples and "**greedy**" in samples and "**sampled**" in samples
    assert metrics["generation"]["new_tokens"] > 0 and metrics["generation"]["tokens_per_second"] > 0


def test_instruction_run_with_lora_saves_a_plain_merged_model(tiny_llama, lm_data, tmp_path):
    out = tmp_path / "lora"
    run_recipe("causal_lm", *tiny_args(tiny_llama, lm_data["instruction"], out, "data.format=instruction",
                                       "data.block_size=64", "data.eval_fraction=0.25", "lora.enabled=true",
                                       "lora.r=4", "lora.alpha=64", "lora.target_modules=[q_proj, v_proj]",
                                       "optim.lr=3.0e-2", "train.epochs=3",
                                       'generation.prompts=["Finish: the quick brown fox"]'))
    model_dir = out / "model"
    assert not list(model_dir.glob("adapter_*")), "model/ must be a plain model, adapters merged"
    merged, base = load_file(model_dir / "model.safetensors"), load_file(tiny_llama / "model.safetensors")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"}

    task = json.loads((model_dir / "tuneforge.json").read_text())
    assert task["chat_template"] is True and task["lora"]["r"] == 4
    hidden, kv = 32, 2 * 8  # q_proj: 32 -> 32, v_proj: 32 -> 2 kv heads x head_dim 8
    assert task["parameters"]["trainable"] == 2 * 4 * ((hidden + hidden) + (hidden + kv))
    losses = [e["train_loss"] for e in read_log(out) if "train_loss" in e]
    # Rank-4 adapters on attention only move a random 32-wide model slowly (ln 300 = 5.70 at the start).
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, f"training loss did not go down: {losses}"
    samples = (out / "samples.md").read_text()
    assert "Finish: the quick brown fox" in samples and samples.count("```text") == 3


def test_two_processes_give_the_one_process_eval(tiny_llama, lm_data, tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 4: same training, same eval over every held-out token."""
    # 28 of the 31 train blocks: every global batch of 4 is full, so no process pads its last batch.
    common = ["train.epochs=2", "data.max_train_samples=28", "checkpoint.at_epoch_end=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe("causal_lm", *tiny_args(tiny_llama, lm_data["text"], one, *common))
    run_recipe("causal_lm", *tiny_args(tiny_llama, lm_data["text"], two, *common, "train.batch_size=2"),
               launcher=LAUNCH_2)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["eval"]["num_tokens"] == m1["eval"]["num_tokens"]
    assert m1["eval"]["num_tokens"] % 31 == 0 and (m1["eval"]["num_tokens"] // 31) % 2 == 1  # odd block count
    assert m2["train"]["samples"] == m1["train"]["samples"]
    assert m2["eval"]["perplexity"] == pytest.approx(m1["eval"]["perplexity"], rel=1e-4)
    assert (two / "samples.md").is_file()


def test_kill_and_resume_gives_the_same_final_eval(gpt2_run, tiny_gpt2, lm_data, tmp_path):
    """SIGKILL mid-training, then resume_from=latest: the same final eval loss (GPT-2 dropout: RNG restored too)."""
    full, extra = gpt2_run
    killed = tmp_path / "killed"
    args = tiny_args(tiny_gpt2, lm_data["text"], killed, *extra)
    proc = subprocess.Popen([sys.executable, str(REPO / "recipes" / "causal_lm.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_5").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"

    run_recipe("causal_lm", *args, "checkpoint.resume_from=latest")
    final_full, final_killed = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert final_killed["train"]["steps"] == final_full["train"]["steps"]
    assert final_killed["last_eval"]["eval_loss"] == pytest.approx(final_full["last_eval"]["eval_loss"], abs=1e-6)
    steps = sorted(e["step"] for e in read_log(killed) if "train_loss" in e)
    assert steps == list(range(1, final_full["train"]["steps"] + 1)), "the resumed log must read as one run"


def test_samples_load_model_dir_only_after_the_training_copy_is_gone(tiny_gpt2, lm_data, tmp_path, monkeypatch):
    """The recipe never holds two models: when the saved model is loaded for samples, the trained one is freed."""
    import gc
    import importlib.util
    import weakref

    from finetune.config import load_config

    spec = importlib.util.spec_from_file_location("_causal_lm_in_process", REPO / "recipes" / "causal_lm.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    args = tiny_args(tiny_gpt2, lm_data["text"], tmp_path / "run", "train.epochs=1")
    cfg = load_config(recipe.Config, REPO / args[1], args[2:])

    weights: list[weakref.ref] = []
    real_build = recipe.build_causal_lm

    def build_and_track(model_cfg, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in weights), "an earlier model is still alive"
        model = real_build(model_cfg, **kwargs)
        weights.extend(weakref.ref(p) for p in model.parameters())
        return model

    monkeypatch.setattr(recipe, "build_causal_lm", build_and_track)
    results = recipe.main(cfg)
    assert results["generation"]["new_tokens"] > 0  # the second model (model/) was loaded and sampled
    assert len(weights) == 2 * len(list(real_build(cfg.model).parameters()))


@pytest.mark.parametrize(("case", "expected"), [
    ("empty_text", "is empty; it needs some text"),
    ("block_too_big", "fewer than one block of data.block_size=4096; lower data.block_size or add text"),
    ("no_response_column", "column 'response' not found in the train split (columns: prompt, answer); "
                           "set data.response_column"),
    ("block_beyond_model", "data.block_size=256 is longer than the model's 128 positions"),
])
def test_bad_input_gives_one_clear_line(tiny_gpt2, lm_data, tmp_path, case, expected):
    data, overrides = lm_data["text"], []
    if case == "empty_text":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "block_too_big":
        overrides = ["data.block_size=4096"]
    elif case == "no_response_column":
        data = tmp_path / "qa.jsonl"
        data.write_text('{"prompt": "hi", "answer": "hello"}\n' * 4)
        overrides = ["data.format=instruction"]
    else:
        (tmp_path / "long.txt").write_text(LM_TEXT * 12)
        data, overrides = tmp_path / "long.txt", ["data.block_size=256"]
    proc = run_recipe("causal_lm", *tiny_args(tiny_gpt2, data, tmp_path / "run", *overrides), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last


@pytest.mark.slow
def test_smollm2_few_steps_from_the_default_config(tmp_path):
    """Real SmolLM2-135M-Instruct (embedded: converted once into the tuneforge cache) on the shipped default."""
    out = tmp_path / "smol"
    run_recipe("causal_lm", "--config", DEFAULT_YAML, f"train.output_dir={out}", "train.max_steps=3",
               "data.max_train_samples=24", "data.max_eval_samples=16", "train.eval_every_n_steps=0",
               "generation.max_new_tokens=24", timeout=1800)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["eval"]["num_tokens"] > 300
    assert metrics["eval"]["eval_loss"] < 0.5, "3 steps on the JSON task should already fit the format"
    task = json.loads((out / "model" / "tuneforge.json").read_text())
    assert task["base_model"] == "embedded:SmolLM2-135M-Instruct" and task["chat_template"] is True
    samples = (out / "samples.md").read_text()
    assert '"name"' in samples, samples
