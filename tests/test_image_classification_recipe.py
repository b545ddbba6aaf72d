"""The image-classification recipe run as users run it: a subprocess, the shipped YAMLs, tiny overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHAPES, run_recipe
from safetensors.torch import load_file

from finetune.evaluation import score_classifier
from serve.bundle.preprocessing import PreprocessingSpec, preprocess_batch

CONFIGS = "recipes/configs/image_classification"
# Each shipped config with a tiny version of its model.
TINY = {
    "default": ["model.config.conv_channels=[[8], [16]]", "model.config.hidden_sizes=[32]"],
    "mnist_cnn": ["model.config.conv_channels=[[8], [16]]", "model.config.hidden_sizes=[32]"],
    "mnist_mlp": ["model.config.hidden_sizes=[64]"],
    "resnet_small": ["model.config.embedding_size=16", "model.config.hidden_sizes=[16, 32]",
                     "model.config.depths=[1, 1]", "augment.enabled=false"],
}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny models train fastest on one thread per process, and do not oversubscribe a shared machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny_args(config: str, data: Path, out: Path, *extra: str) -> list[str]:
    """A shipped config pointed at the generated shapes; tiny model and batches."""
    return ["--config", f"{CONFIGS}/{config}.yaml", *TINY[config], f"data.train={data}",
            f"data.label_names=[{', '.join(SHAPES)}]", f"train.output_dir={out}", "train.batch_size=8",
            "train.eval_batch_size=8", "train.log_every_n_steps=1", "optim.warmup_ratio=0.0", *extra]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def reloaded_logits(run_dir: Path, npz: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits of the eval images through model/ (from_pretrained) and through the last checkpoint's weights,
    both fed by the torch-free preprocessing that serving uses; and tuneforge.json."""
    from transformers import AutoModelForImageClassification

    import finetune.vision.architectures  # noqa: F401  (registers the baselines)

    task = json.loads((run_dir / "model" / "tuneforge.json").read_text())
    pixel_values = torch.from_numpy(preprocess_batch(list(np.load(npz)["x_test"]),
                                                     PreprocessingSpec.from_dict(task["preprocessing"])))
    model = AutoModelForImageClassification.from_pretrained(run_dir / "model").eval()
    twin = AutoModelForImageClassification.from_config(model.config).eval()
    twin.load_state_dict(load_file(run_dir / "checkpoints" / f"step_{task['step']}" / "model.safetensors"))
    with torch.no_grad():
        return model(pixel_values).logits, twin(pixel_values).logits, task


@pytest.mark.parametrize(("config", "architecture", "epochs"), [
    ("default", "SimpleCNNForImageClassification", 8),
    ("mnist_mlp", "MLPForImageClassification", 10),
    ("resnet_small", "ResNetForImageClassification", 8),
])
def test_recipe_learns_writes_a_complete_run_dir_and_the_model_reloads(shape_npz, tmp_path, config, architecture,
                                                                        epochs):
    out = tmp_path / "run"
    run_recipe("image_classification", *tiny_args(config, shape_npz, out, f"train.epochs={epochs}",
                                                  "optim.lr=3.0e-3", "checkpoint.select_best=false"))

    for name in ("config.yaml", "metrics.json", "curves.png", "confusion_matrix.png", "misclassified.png",
                 "logs/metrics.jsonl", "logs/train.log", "model/config.json", "model/model.safetensors",
                 "model/tuneforge.json"):
        assert (out / name).is_file(), f"{name} missing from the run directory"
    assert not list((out / "model").glob("*.bin")), "weights must be safetensors only"
    steps = 6 * epochs  # 48 images / batch 8
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{steps}"]

    losses = [e["train_loss"] for e in read_log(out) if "train_loss" in e]
    assert len(losses) == steps
    assert sum(losses[-6:]) < 0.5 * sum(losses[:6]), "training loss did not go down"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["num_examples"] == 17 and metrics["train"]["samples"] == 48 * epochs
    assert metrics["eval"]["accuracy"] >= 0.7
    assert set(metrics["eval"]["per_class"]) == set(SHAPES)
    assert sum(c["support"] for c in metrics["eval"]["per_class"].values()) == 17

    logits, twin_logits, task = reloaded_logits(out, shape_npz)
    assert torch.equal(logits, twin_logits), "model/ differs from the last checkpoint's weights"
    assert task["task"] == "image-classification" and task["label_names"] == SHAPES
    assert task["architecture"] == architecture and task["step"] == steps
    assert task["preprocessing"]["size"] == [12, 12] and task["preprocessing"]["color_mode"] == "L"
    # Served through the torch-free preprocessing, the saved model scores what the run measured.
    y = np.load(shape_npz)["y_test"]
    rescored = score_classifier(logits.numpy(), y, num_labels=3)
    assert rescored["accuracy"] == task["eval"]["accuracy"]
    assert rescored["eval_loss"] == pytest.approx(task["eval"]["eval_loss"], abs=1e-5)


def test_kill_and_resume_matches_the_uninterrupted_run(shape_npz, tmp_path):
    """A SIGKILL mid-training, then resume_from=latest, ends with the same weights.

    Dropout, batch norm and augmentation (shifts, rotations) are on: RNG states and the augmentation keys must be
    restored too.
    """
    args = ["train.epochs=10", "checkpoint.every_n_steps=5", "checkpoint.keep_last=3", "checkpoint.select_best=false"]
    full = tmp_path / "full"
    run_recipe("image_classification", *tiny_args("mnist_cnn", shape_npz, full, *args))

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "recipes" / "image_classification.py"),
           *tiny_args("mnist_cnn", shape_npz, killed, *args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    target = killed / "checkpoints" / "step_15"
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert "step_60" not in done, "the run finished before it could be killed; the test proves nothing"

    run_recipe("image_classification", *tiny_args("mnist_cnn", shape_npz, killed, *args,
                                                  "checkpoint.resume_from=latest"))
    a = load_file(full / "checkpoints" / "step_60" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step_60" / "model.safetensors")
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    full_log = {e["step"]: e for e in read_log(full) if "train_loss" in e}
    killed_log = {e["step"]: e for e in read_log(killed) if "train_loss" in e}
    assert sorted(killed_log) == sorted(full_log) == list(range(1, 61)), "the resumed log must read as one run"
    assert killed_log[60]["train_loss"] == pytest.approx(full_log[60]["train_loss"], abs=1e-6)
    # Augmentation was on, yet eval saw the plain images: the torch-free pipeline reproduces the run's scores.
    logits, _, task = reloaded_logits(killed, shape_npz)
    rescored = score_classifier(logits.numpy(), np.load(shape_npz)["y_test"], num_labels=3)
    assert rescored["eval_loss"] == pytest.approx(task["eval"]["eval_loss"], abs=1e-5)


def test_two_processes_match_one_with_the_same_global_batch(shape_npz, tmp_path):
    """2 gloo processes x batch 4 == 1 process x batch 8: same eval loss; eval counts every example once.

    The MLP without dropout or augmentation: nothing random differs between the two (batch norm would see
    per-process batches)."""
    common = ["train.epochs=2", "augment.enabled=false", "model.config.dropout=0.0", "checkpoint.at_epoch_end=false",
              "optim.lr=3.0e-3"]
    one = tmp_path / "one"
    run_recipe("image_classification", *tiny_args("mnist_mlp", shape_npz, one, *common))
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"]
    run_recipe("image_classification", *tiny_args("mnist_mlp", shape_npz, two, *common, "train.batch_size=4"),
               launcher=launcher)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["eval"]["num_examples"] == m1["eval"]["num_examples"] == 17
    assert m2["train"]["samples"] == m1["train"]["samples"] == 2 * 48
    assert m2["last_eval"]["eval_loss"] == pytest.approx(m1["last_eval"]["eval_loss"], rel=1e-4, abs=1e-5)
    assert m2["eval"]["confusion_matrix"] == m1["eval"]["confusion_matrix"]
    log1 = {e["step"]: e["train_loss"] for e in read_log(one) if "train_loss" in e}
    log2 = {e["step"]: e["train_loss"] for e in read_log(two) if "train_loss" in e}
    assert log2[12] == pytest.approx(log1[12], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.train=/nonexistent/images.npz"], "does not exist"),
    (["model.config.conv_chanels=[8]"], "simple_cnn has no setting 'conv_chanels'; did you mean "
                                        "model.config.conv_channels?"),
    (["data.color_mode=rgb"], "data.color_mode: 'rgb' is not one of"),
])
def test_bad_input_gives_one_clear_line(shape_npz, tmp_path, overrides, expected):
    proc = run_recipe("image_classification", *tiny_args("default", shape_npz, tmp_path / "run"), *overrides,
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
