"""finetune.checkpoint and finetune.rundir with a real CPU accelerate.Accelerator and a small torch model."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import (
    STATE_FILE,
    CheckpointConfig,
    CheckpointManager,
    EarlyStoppingConfig,
    TrainState,
    complete_checkpoints,
    improved,
    metric_value,
    read_train_state,
    resolve_checkpoint,
    resume_state,
    stopped_early,
    update_early_stopping,
)
from finetune.errors import CheckpointError, ConfigError
from finetune.loop import record_eval
from finetune.rundir import open_run_dir, write_json
from serve.bundle.folders import RUN_MARKER, read_run_marker, write_run_marker


@pytest.fixture
def accelerator():
    """A fresh Accelerator per test, so save_state sees only that test's model/optimizer/scheduler."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def trained(accelerator):
    """A prepared model/optimizer/scheduler after two optimizer steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def manager(accelerator, run_dir, **cfg) -> CheckpointManager:
    """The checkpoints of a run directory (marked as open_run_dir marks it: rotation deletes only in a run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_run_marker(run_dir) is None:
        write_run_marker(run_dir)
    return CheckpointManager(accelerator, run_dir, CheckpointConfig(**cfg))


def fake_checkpoint(run_dir, name: str, *, complete: bool = True):
    folder = run_dir / "checkpoints" / name
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text(json.dumps(dataclasses.asdict(TrainState(global_step=1))))
    return folder


# --- save / rotate / resolve --------------------------------------------------------------------------------

def test_save_writes_a_complete_checkpoint_atomically(accelerator, trained, tmp_path):
    state = TrainState(global_step=7, epoch=1, step_in_epoch=3, samples_seen=56, best_metric=0.5, best_step=4)
    path = manager(accelerator, tmp_path).save(state)
    assert path == tmp_path / "checkpoints" / "step_7"
    assert (path / STATE_FILE).is_file() and (path / "model.safetensors").is_file()
    assert not list(path.glob("model_*.safetensors")), "only this test's model should be saved"
    assert json.loads((path / STATE_FILE).read_text()) == dataclasses.asdict(state)
    assert not list((tmp_path / "checkpoints").glob(".tmp-step_*"))
    saved = load_file(path / "model.safetensors")
    model = accelerator.unwrap_model(trained[0])
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_keep_last_rotates_old_checkpoints(accelerator, trained, tmp_path):
    checkpoints = manager(accelerator, tmp_path, keep_last=2)
    for step in (1, 2, 10, 3):
        checkpoints.save(TrainState(global_step=step))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_10", "step_3"]  # newest by step number, not by write order


def test_save_removes_stale_temp_folders_and_replaces_the_same_step(accelerator, trained, tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step_99"
    stale.mkdir(parents=True)
    checkpoints = manager(accelerator, tmp_path, keep_last=3)
    checkpoints.save(TrainState(global_step=5, samples_seen=1))
    checkpoints.save(TrainState(global_step=5, samples_seen=2))
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_5"]
    assert read_train_state(tmp_path / "checkpoints" / "step_5").samples_seen == 2


def test_complete_checkpoints_ignores_partial_folders(tmp_path):
    assert complete_checkpoints(tmp_path) == []
    fake_checkpoint(tmp_path, "step_2")
    fake_checkpoint(tmp_path, "step_12")
    fake_checkpoint(tmp_path, ".tmp-step_9")
    fake_checkpoint(tmp_path, "step_20", complete=False)
    fake_checkpoint(tmp_path, "other")
    (tmp_path / "checkpoints" / "step_30").write_text("a file, not a folder")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_2", "step_12"]


def test_resolve_latest_picks_the_highest_complete_step(tmp_path):
    for name in ("step_9", "step_10", "step_100"):
        fake_checkpoint(tmp_path, name)
    fake_checkpoint(tmp_path, "step_200", complete=False)
    fake_checkpoint(tmp_path, ".tmp-step_300")
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "step_100"


def test_resolve_latest_without_checkpoints_errors(tmp_path):
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path, "latest")
    fake_checkpoint(tmp_path, "step_3", complete=False)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path, "latest")


def test_resolve_a_path(tmp_path):
    good = fake_checkpoint(tmp_path, "step_4")
    assert resolve_checkpoint(tmp_path / "elsewhere", str(good)) == good
    bad = fake_checkpoint(tmp_path, "step_5", complete=False)
    with pytest.raises(CheckpointError, match=f"is not a complete checkpoint \\(no {STATE_FILE}\\)"):
        resolve_checkpoint(tmp_path, str(bad))
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "missing"))


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(accelerator, trained, tmp_path):
    checkpoints = manager(accelerator, tmp_path, keep_last=2)
    for step in (2, 4):
        checkpoints.save(TrainState(global_step=step))
    checkpoints.load(tmp_path / "checkpoints" / "step_2")  # step_4 diverged: go back
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_2"]
    assert (tmp_path / "checkpoints" / "superseded" / "step_4" / STATE_FILE).is_file()
    checkpoints.save(TrainState(global_step=3))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_2", "step_3"]  # the one resumed from is kept
    assert resolve_checkpoint(tmp_path, "latest").name == "step_3"


def test_resume_state_forgets_a_best_metric_without_a_saved_model(tmp_path):
    source = fake_checkpoint(tmp_path / "a", "step_4")
    write_json(source / STATE_FILE, dataclasses.asdict(TrainState(global_step=4, best_metric=0.9, best_step=4)))
    assert resume_state(tmp_path / "b", None) == TrainState()
    fresh = resume_state(tmp_path / "b", source)  # another run's checkpoint, into a new folder: no model/ there
    assert (fresh.global_step, fresh.best_metric, fresh.best_step) == (4, None, None)
    (tmp_path / "a" / "model").mkdir()
    write_json(tmp_path / "a" / "model" / "tuneforge.json", {})
    assert resume_state(tmp_path / "a", source).best_metric == 0.9


def test_load_restores_weights_optimizer_and_train_state(accelerator, trained, tmp_path):
    model, optimizer, scheduler = trained
    state = TrainState(global_step=2, epoch=0, step_in_epoch=2, samples_seen=32, stale_evals=1,
                       early_stopping_best=0.25)
    checkpoints = manager(accelerator, tmp_path)
    path = checkpoints.save(state)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    lr = scheduler.get_last_lr()[0]

    with torch.no_grad():  # move everything away from the checkpoint
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    assert not torch.equal(model.state_dict()["0.weight"], weights["0.weight"])

    restored = checkpoints.load(path)
    assert restored == state
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    after = optimizer.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in moments.items())
    assert scheduler.get_last_lr()[0] == pytest.approx(lr)


# --- best model and early stopping --------------------------------------------------------------------------

def test_improved():
    assert improved(1.0, None, "min") and improved(1.0, None, "max")
    assert not improved(float("nan"), None, "min") and not improved(float("nan"), 1.0, "max")
    assert improved(5.0, float("nan"), "min") and improved(0.0, float("nan"), "max")
    assert improved(0.9, 1.0, "min") and not improved(1.0, 1.0, "min") and not improved(1.1, 1.0, "min")
    assert improved(1.1, 1.0, "max") and not improved(1.0, 1.0, "max") and not improved(0.9, 1.0, "max")
    assert not improved(0.95, 1.0, "min", min_delta=0.1) and improved(0.85, 1.0, "min", min_delta=0.1)
    assert not improved(1.05, 1.0, "max", min_delta=0.1) and improved(1.15, 1.0, "max", min_delta=0.1)


def run_early_stopping(values: list[float], cfg: EarlyStoppingConfig) -> tuple[list[bool], TrainState]:
    state = TrainState()
    return [update_early_stopping(state, {cfg.metric: v}, cfg) for v in values], state


def test_early_stopping_counts_stale_evaluations_min():
    stops, state = run_early_stopping([1.0, 0.9, 0.95, 0.8, 0.85, 0.81], EarlyStoppingConfig(patience=2))
    assert stops == [False, False, False, False, False, True]
    assert state.stale_evals == 2 and state.early_stopping_best == 0.8


def test_early_stopping_max_mode():
    cfg = EarlyStoppingConfig(patience=1, metric="accuracy", mode="max")
    stops, state = run_early_stopping([0.5, 0.6, 0.6], cfg)
    assert stops == [False, False, True] and state.early_stopping_best == 0.6


def test_early_stopping_min_delta():
    cfg = EarlyStoppingConfig(patience=2, min_delta=0.05)
    stops, state = run_early_stopping([1.0, 0.97, 0.96, 0.9], cfg)
    assert stops == [False, False, True, False]  # 0.97 and 0.96 improve by less than 0.05
    assert state.early_stopping_best == 0.9 and state.stale_evals == 0


def test_a_run_stopped_early_stays_stopped_on_resume():
    _, state = run_early_stopping([1.0, 1.1, 1.2], EarlyStoppingConfig(patience=2))
    assert stopped_early(state, EarlyStoppingConfig(patience=2))
    assert not stopped_early(state, EarlyStoppingConfig(patience=3))  # resumed with more patience: go on
    assert not stopped_early(state, EarlyStoppingConfig(patience=0))


def test_record_eval_keeps_a_model_when_the_metric_is_nan():
    accelerator, cfg, saved = SimpleNamespace(log=lambda *a, **k: None), CheckpointConfig(), []
    state = TrainState()
    for step, loss in enumerate([float("nan"), 0.7, float("nan"), 0.5, 0.6], start=1):
        state.global_step = step
        record_eval(accelerator, state, {"eval_loss": loss}, cfg, EarlyStoppingConfig(),
                        lambda: saved.append(state.global_step))
    assert saved == [1, 2, 4]  # the first model (NaN) so the run has one, then each finite best
    assert (state.best_metric, state.best_step) == (0.5, 4)


def test_patience_zero_never_stops():
    stops, state = run_early_stopping([1.0, 2.0, 3.0, 4.0, 5.0], EarlyStoppingConfig(patience=0))
    assert not any(stops) and state.stale_evals == 0 and state.early_stopping_best is None


def test_metric_value_unknown_metric_lists_available():
    metrics = {"eval_loss": 0.3, "accuracy": 0.9, "num_examples": 17, "confusion_matrix": [[1]]}
    assert metric_value(metrics, "accuracy", "checkpoint.best_metric") == 0.9
    assert isinstance(metric_value(metrics, "num_examples", "k"), float)
    with pytest.raises(ConfigError) as info:
        metric_value(metrics, "f1", "checkpoint.best_metric")
    message = str(info.value)
    assert "checkpoint.best_metric is 'f1'" in message
    assert message.endswith("use one of eval_loss, accuracy, num_examples")
    with pytest.raises(ConfigError, match=r"early_stopping\.metric"):
        update_early_stopping(TrainState(), metrics, EarlyStoppingConfig(patience=1, metric="f1"))


def test_checkpoint_config_validates_keep_last():
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointConfig(keep_last=0)


# --- run directory ------------------------------------------------------------------------------------------

def test_open_run_dir_creates_a_marked_folder(accelerator, tmp_path):
    run_dir = open_run_dir(accelerator, tmp_path / "run", resume=False, overwrite=False)
    assert (run_dir / "logs").is_dir() and read_run_marker(run_dir)["id"]
    # An existing empty folder is not a run: no error.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (open_run_dir(accelerator, empty, resume=False, overwrite=False) / "logs").is_dir()


def occupied_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "config.yaml").write_text("task: classification\n")
    (run_dir / "metrics.json").write_text("{}")
    write_run_marker(run_dir)
    return run_dir


def test_open_run_dir_refuses_an_occupied_folder(accelerator, tmp_path):
    run_dir = occupied_run(tmp_path)
    with pytest.raises(ConfigError) as info:
        open_run_dir(accelerator, run_dir, resume=False, overwrite=False)
    message = str(info.value)
    for hint in ("checkpoint.resume_from=latest", "train.overwrite=true", "train.output_dir"):
        assert hint in message
    assert (run_dir / "metrics.json").is_file(), "a refused run must not touch the folder"


def test_open_run_dir_overwrite_replaces(accelerator, tmp_path):
    run_dir = occupied_run(tmp_path)
    old_id = read_run_marker(run_dir)["id"]
    open_run_dir(accelerator, run_dir, resume=False, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER, "logs"]
    assert read_run_marker(run_dir)["id"] != old_id


def test_open_run_dir_overwrite_replaces_only_a_run(accelerator, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"is not a tuneforge run directory .* choose a new train\.output_dir"):
        open_run_dir(accelerator, project, resume=False, overwrite=True)
    assert (project / "notes.txt").read_text() == "mine" and (project / "src").is_dir()

    run_dir = occupied_run(tmp_path)
    monkeypatch.chdir(run_dir / "model")
    with pytest.raises(ConfigError, match="the current folder is inside it"):
        open_run_dir(accelerator, run_dir, resume=False, overwrite=True)
    assert (run_dir / "metrics.json").is_file()


def test_open_run_dir_resume_keeps_contents(accelerator, tmp_path):
    run_dir = occupied_run(tmp_path)
    for overwrite in (False, True):  # resuming wins over overwrite
        open_run_dir(accelerator, run_dir, resume=True, overwrite=overwrite)
        assert (run_dir / "metrics.json").is_file() and (run_dir / "model").is_dir()
        assert (run_dir / "logs").is_dir()


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1, "nested": {"b": [1, 2]}})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_json_converts_numpy_scalars(tmp_path):
    import numpy as np

    path = tmp_path / "m.json"
    write_json(path, {"x": np.float32(0.5), "y": np.float64(0.25)})
    assert json.loads(path.read_text()) == {"x": 0.5, "y": 0.25}
