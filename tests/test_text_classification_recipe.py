"""The text-classification recipe run as users run it: a subprocess, the shipped YAML, tiny overrides."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_recipe
from safetensors.torch import load_file

DEFAULT_YAML = "recipes/configs/text_classification/default.yaml"


def tiny_args(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The shipped default config pointed at the tiny model and data; small batches, fast settings."""
    return ["--config", DEFAULT_YAML, f"model.name_or_path={model}", f"data.train={data['train']}",
            f"data.eval={data['eval']}", "data.label_names=[negative, positive]", f"train.output_dir={out}",
            "train.batch_size=8", "train.log_every_n_steps=1", "optim.lr=3.0e-3", "optim.warmup_ratio=0.0",
            "early_stopping.patience=0", *extra]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_recipe_end_to_end_learns_and_writes_a_complete_run_dir(tiny_bert, sentiment_data, tmp_path):
    out = tmp_path / "run"
    run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, out, "train.epochs=8"))

    for name in ("config.yaml", "metrics.json", "curves.png", "confusion_matrix.png", "logs/metrics.jsonl",
                 "logs/train.log", "model/config.json", "model/model.safetensors", "model/tokenizer.json",
                 "model/tuneforge.json"):
        assert (out / name).is_file(), f"{name} missing from the run directory"
    assert not list((out / "model").glob("*.bin")), "weights must be safetensors only"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_96"]  # keep_last: 1 in default.yaml

    log = read_log(out)
    losses = [e["train_loss"] for e in log if "train_loss" in e]
    assert len(losses) == 96
    assert sum(losses[-12:]) < 0.5 * sum(losses[:12]), "training loss did not go down"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["num_examples"] == 17
    assert metrics["eval"]["accuracy"] >= 0.8
    assert metrics["train"]["steps"] == 96 and metrics["train"]["samples"] == 8 * 96

    task = json.loads((out / "model" / "tuneforge.json").read_text())
    assert task["label_names"] == ["negative", "positive"] and task["task"] == "text-classification"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "model").id2label == {0: "negative", 1: "positive"}
    saved = (out / "config.yaml").read_text()
    assert f"output_dir: {out}" in saved and "lr: 0.003" in saved


def test_regression_task(tiny_bert, sentiment_data, tmp_path):
    out = tmp_path / "reg"
    run_recipe("text_classification",
               "--config", "recipes/configs/text_classification/rating_regression.yaml",
               f"model.name_or_path={tiny_bert}", f"data.train={sentiment_data['train']}",
               f"data.eval={sentiment_data['eval']}", "data.label_column=score", f"train.output_dir={out}",
               "train.batch_size=8", "train.epochs=3", "optim.lr=3.0e-3", "train.log_every_n_steps=1")
    metrics = json.loads((out / "metrics.json").read_text())["eval"]
    assert {"mse", "mae", "r2", "pearson"} <= metrics.keys()
    losses = [e["train_loss"] for e in read_log(out) if "train_loss" in e]
    assert sum(losses[-6:]) < 0.5 * sum(losses[:6])
    assert json.loads((out / "model" / "tuneforge.json").read_text())["task"] == "text-regression"


def test_kill_and_resume_matches_the_uninterrupted_run(tiny_bert_dropout, sentiment_data, tmp_path):
    """A SIGKILL mid-training, then resume_from=latest, ends with the same weights.

    Dropout is on, so this also checks that the RNG states are restored.
    """
    args = ["train.epochs=6", "checkpoint.every_n_steps=5", "checkpoint.keep_last=3",
            "train.max_grad_norm=1.0"]
    full = tmp_path / "full"
    run_recipe("text_classification", *tiny_args(tiny_bert_dropout, sentiment_data, full, *args))

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "recipes" / "text_classification.py"),
           *tiny_args(tiny_bert_dropout, sentiment_data, killed, *args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    target = killed / "checkpoints" / "step_15"
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert "step_70" not in done, "the run finished before it could be killed; the test proves nothing"

    run_recipe("text_classification", *tiny_args(tiny_bert_dropout, sentiment_data, killed, *args,
                                                   "checkpoint.resume_from=latest"))
    a = load_file(full / "checkpoints" / "step_72" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step_72" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    full_log = {e["step"]: e for e in read_log(full) if "train_loss" in e}
    killed_log = {e["step"]: e for e in read_log(killed) if "train_loss" in e}
    assert sorted(killed_log) == sorted(full_log) == list(range(1, 73)), \
        "the resumed log must read as one run"
    assert killed_log[72]["train_loss"] == pytest.approx(full_log[72]["train_loss"], abs=1e-6)


def test_half_written_checkpoint_is_never_resumed(tiny_bert, sentiment_data, tmp_path):
    out = tmp_path / "run"
    run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, out, "train.epochs=1",
                                                   "checkpoint.keep_last=2"))
    ckpts = out / "checkpoints"
    # What a kill during a save leaves: a temp folder, and a renamed-looking folder without the state file.
    shutil.copytree(ckpts / "step_12", ckpts / ".tmp-step_30")
    shutil.copytree(ckpts / "step_12", ckpts / "step_40")
    (ckpts / "step_40" / "train_state.json").unlink()
    proc = run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, out, "train.epochs=2",
                                                          "checkpoint.resume_from=latest"))
    assert "resumed from" in proc.stderr
    assert "step_12" in proc.stderr.split("resumed from", 1)[1].splitlines()[0]
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 24


@pytest.mark.parametrize("group_by_length", ["false", "true"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_bert, sentiment_data, tmp_path,
                                                             group_by_length):
    """2 gloo processes x batch 4 == 1 process x batch 8: same eval loss; eval counts every example once."""
    common = ["train.epochs=2", f"data.group_by_length={group_by_length}", "checkpoint.at_epoch_end=false"]
    one = tmp_path / "one"
    run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, one, *common))
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"]
    run_recipe("text_classification",
               *tiny_args(tiny_bert, sentiment_data, two, *common, "train.batch_size=4"), launcher=launcher)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["eval"]["num_examples"] == m1["eval"]["num_examples"] == 17
    assert m2["train"]["samples"] == m1["train"]["samples"] == 2 * 96
    assert m2["last_eval"]["eval_loss"] == pytest.approx(m1["last_eval"]["eval_loss"], rel=1e-4, abs=1e-5)
    log1 = {e["step"]: e["train_loss"] for e in read_log(one) if "train_loss" in e}
    log2 = {e["step"]: e["train_loss"] for e in read_log(two) if "train_loss" in e}
    assert log2[24] == pytest.approx(log1[24], rel=1e-4, abs=1e-5)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_on_one_host_match_one_process(tiny_bert, sentiment_data, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank {0,1}` (one gloo process per "machine", rendezvous on
    127.0.0.1), as a user types it on two machines: the same eval loss and counts as one process with the same
    global batch."""
    common = ["train.epochs=2", "checkpoint.at_epoch_end=false"]
    one = tmp_path / "one"
    run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, one, *common))
    two, port = tmp_path / "two", free_port()
    args = [str(REPO / "recipes" / "text_classification.py"),
            *tiny_args(tiny_bert, sentiment_data, two, *common, "train.batch_size=4")]
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", *args], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}) for rank in (0, 1)]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["eval"]["num_examples"] == m1["eval"]["num_examples"] == 17
    assert m2["train"]["samples"] == m1["train"]["samples"] == 2 * 96
    assert m2["last_eval"]["eval_loss"] == pytest.approx(m1["last_eval"]["eval_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.train=/nonexistent/train.csv"], "does not exist"),
    (["data.text_column=review"],
     "column 'review' not found in the train split (columns: text, sentiment, score); set data.text_column"),
    (["train.epochz=3"], "unknown config key train.epochz; did you mean train.epochs?"),
    (["model.name_or_path=/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["model.num_labels=3"], "the data has 2 labels (negative, positive) but model.num_labels is 3"),
    (["data.label_names=[neg, pos]"], "labels ['negative', 'positive'] are not in data.label_names"),
])
def test_bad_input_gives_one_clear_line(tiny_bert, sentiment_data, tmp_path, overrides, expected):
    args = tiny_args(tiny_bert, sentiment_data, tmp_path / "run") + overrides
    proc = run_recipe("text_classification", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last


def test_fsdp_on_two_cpu_processes_matches_ddp_saves_resumes_and_exports_a_plain_model(tiny_bert, sentiment_data,
                                                                                       tmp_path):
    """The shipped fsdp.yaml (FSDP2) on 2 gloo processes. On a CPU it needs `--fsdp_cpu_ram_efficient_loading false`:
    with it on, ranks > 0 load the weights on the meta device and accelerate's prepare fails ("Cannot copy out of meta
    tensor"). Straight through: the eval loss of one process with the same global batch. Stopped at step 12 and
    resumed from its checkpoint: the loss DDP gets from the same stop and resume. model/ loads as a plain model."""
    common = ["train.epochs=2", "checkpoint.at_epoch_end=false", "checkpoint.every_n_steps=12"]
    ddp = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "recipes" / "configs" / "accelerate" / "fsdp.yaml"), "--mixed_precision", "no",
            "--fsdp_cpu_ram_efficient_loading", "false", "--main_process_port", "0"]

    def loss(run: Path) -> float:
        return json.loads((run / "metrics.json").read_text())["last_eval"]["eval_loss"]

    one = tmp_path / "one"
    run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, one, *common))
    straight = tmp_path / "fsdp"
    run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, straight, *common, "train.batch_size=4"),
               launcher=fsdp)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["eval"]["num_examples"] == 17 and metrics["train"]["steps"] == 24
    assert loss(straight) == pytest.approx(loss(one), rel=1e-4, abs=1e-5)
    resumed = {}
    for name, launcher in (("ddp", ddp), ("fsdp", fsdp)):
        run = tmp_path / f"{name}-resumed"
        for extra in ("train.max_steps=12", "checkpoint.resume_from=latest"):
            run_recipe("text_classification", *tiny_args(tiny_bert, sentiment_data, run, *common, "train.batch_size=4",
                                                         extra), launcher=launcher)
        assert "resumed from" in (run / "logs" / "train.log").read_text()
        resumed[name] = loss(run)
    assert resumed["fsdp"] == pytest.approx(resumed["ddp"], rel=1e-4, abs=1e-5)
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(straight / "model")  # no FSDP wrapper, no sharding
    assert plain.config.id2label == {0: "negative", 1: "positive"}


def test_slurm_script_launches_one_accelerate_per_node(tmp_path):
    """recipes/slurm/multinode.sbatch under stand-ins for scontrol, srun (2 nodes) and accelerate: bash accepts it,
    and each node runs `accelerate launch` with its own machine rank and the rendezvous on the first node."""
    script = REPO / "recipes" / "slurm" / "multinode.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        # srun: the command once per node, with that node's SLURM_PROCID
        "srun": 'for rank in 0 1; do SLURM_PROCID=$rank "$@" || exit 1; done',
        "accelerate": 'echo "$SLURM_PROCID: $*" >> "$LAUNCHES"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    launches = tmp_path / "launches.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "GPUS_PER_NODE": "2", "LAUNCHES": str(launches)}
    proc = subprocess.run(["bash", str(script), "recipes/causal_lm.py", "--config", "x.yaml", "train.epochs=1"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = launches.read_text().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line.startswith(f"{rank}: launch --multi_gpu --num_machines 2 --num_processes 4 --machine_rank {rank} "
                               "--main_process_ip node-a --main_process_port 29500 --rdzv_backend c10d")
        assert line.endswith("recipes/causal_lm.py --config x.yaml train.epochs=1")
