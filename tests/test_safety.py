"""Nothing a user owns is deleted, a failed run never blocks its rerun, bad numbers are refused at load, and
artifacts carry no absolute path of the machine that built them (issue 14)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, run_recipe

from compress.distill import distill_run
from compress.errors import StageError
from compress.pipeline import transform_stage
from compress.prune import PruneConfig, prune_run
from finetune.checkpoint import CheckpointConfig, EarlyStoppingConfig
from finetune.config import config_from_dict
from finetune.errors import ConfigError
from finetune.loop import TrainConfig
from finetune.optim import OptimConfig
from finetune.text.data import TextDataConfig
from finetune.vision.data import ImageDataConfig
from serve.bundle.folders import RUN_MARKER, read_run_marker, write_run_marker


def make_project(path: Path) -> dict[str, str]:
    """A user's project folder that happens to hold config.yaml and logs/ (what a run also has); returns its files."""
    files = {"config.yaml": "name: thesis\n", "logs/today.txt": "notes", "src/main.py": "print('mine')\n",
             "thesis.tex": "\\documentclass{article}"}
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return files


def assert_untouched(path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (path / name).read_text() == text, f"{name} was changed or deleted"


def text_args(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--config", "recipes/configs/text_classification/default.yaml", f"model.name_or_path={model}",
            f"data.train={data['train']}", f"data.eval={data['eval']}", "data.label_names=[negative, positive]",
            f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=2", *extra]


# --- 1. train.overwrite deletes only a marked run directory that holds nothing else --------------------------------

def test_overwrite_refuses_a_project_with_config_yaml_and_logs(tiny_bert, sentiment_data, tmp_path):
    project = tmp_path / "project"
    files = make_project(project)
    proc = run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, project, "train.overwrite=true"),
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not a tuneforge run directory" in proc.stderr and "Traceback" not in proc.stderr
    assert_untouched(project, files)


def test_overwrite_refuses_a_run_directory_holding_foreign_files(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    write_run_marker(run_dir)
    (run_dir / "thesis.tex").write_text("mine")
    (run_dir / "drafts").mkdir()
    from finetune.rundir import check_run_dir

    with pytest.raises(ConfigError, match=r"it holds drafts, thesis\.tex, which a tuneforge run directory never holds"):
        check_run_dir(run_dir, resume=False, overwrite=True)
    assert (run_dir / "thesis.tex").read_text() == "mine"


# --- 2. prune, distill and the pipeline replace folders only through the guard ------------------------------------

@pytest.mark.parametrize("stage", ["prune", "distill"])
def test_prune_and_distill_overwrite_refuse_a_folder_of_notes(stage, tmp_path):
    notes = tmp_path / "notes"
    files = make_project(notes)
    source = tmp_path / "no-such-run"  # refused before the source is even read
    with pytest.raises(StageError, match="is not a tuneforge run directory"):
        if stage == "prune":
            prune_run(source, notes, config=PruneConfig(method="unstructured", sparsity=0.5), overwrite=True)
        else:
            distill_run(source, notes, overwrite=True)
    assert_untouched(notes, files)


def test_pipeline_keeps_a_stage_folder_unless_asked_to_overwrite(tmp_path):
    seen = []

    def fake_prune(run_dir, out, *, config, overwrite, trainer):
        seen.append(overwrite)
        raise StageError("stop here")

    p = SimpleNamespace(cfg=SimpleNamespace(out=str(tmp_path / "bundle"), overwrite=False, data=None), trainer=None,
                        lineage=SimpleNamespace(run=SimpleNamespace(run_dir=tmp_path / "run")))
    (tmp_path / "bundle-runs" / "pruned").mkdir(parents=True)
    (tmp_path / "bundle-runs" / "pruned" / "mine.txt").write_text("mine")
    with pytest.raises(StageError, match="stop here"):
        transform_stage(fake_prune, "pruned")(p, None)
    assert seen == [False] and (tmp_path / "bundle-runs" / "pruned" / "mine.txt").read_text() == "mine"


DELETERS = {"rmtree", "rmdir", "move"}  # shutil.rmtree / os.rmdir / shutil.move
REPLACERS = {"replace", "rename", "renames"}  # os.replace / os.rename or Path.replace(target) / Path.rename(target)


def test_every_folder_deletion_or_replacement_goes_through_the_guarded_module():
    """The guard is one module (serve/bundle/folders.py): any rmtree / replace / rename elsewhere in the packages
    fails this test."""
    unguarded, checked = [], 0
    for package in ("finetune", "compress", "serve"):
        for path in sorted((REPO / package).rglob("*.py")):
            checked += 1
            if path == REPO / "serve" / "bundle" / "folders.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                # str.replace(old, new) has two arguments and dataclasses.replace(obj, **changes) keywords; a path
                # replace / rename has one target, os.replace / os.rename two
                one_target = (len(node.args) == 1 and not node.keywords) or (
                    isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "os")
                if name in DELETERS or (name in REPLACERS and one_target):
                    unguarded.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert checked > 50
    assert not unguarded, f"deletions / replacements outside serve/bundle/folders.py: {unguarded}"


# --- 3. a failed run leaves nothing behind, and never blocks its rerun ------------------------------------------

def test_a_run_failing_on_its_input_leaves_nothing_and_the_fixed_command_runs(tiny_bert, sentiment_data, tmp_path):
    out = tmp_path / "run"
    proc = run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out, "data.text_column=review"),
                      check=False)
    assert proc.returncode == 2 and "column 'review' not found" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists(), f"a failed start left {list(out.iterdir())}"
    run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out))  # no overwrite needed
    assert (out / "model" / "tuneforge.json").is_file() and read_run_marker(out) is not None


def test_a_run_failing_before_its_first_checkpoint_logs_why_and_is_replaced_on_rerun(tiny_bert, sentiment_data,
                                                                                    tmp_path):
    out = tmp_path / "run"
    # Fails at the first evaluation (after the run directory was created, before any checkpoint or model).
    proc = run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out,
                                                        "checkpoint.best_metric=f1_weird"), check=False)
    assert proc.returncode == 2 and "checkpoint.best_metric is 'f1_weird'" in proc.stderr
    assert "checkpoint.best_metric is 'f1_weird'" in (out / "logs" / "train.log").read_text()
    run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out))
    assert (out / "model" / "tuneforge.json").is_file()


# --- 4 and 5. numbers and lists are checked when the config loads --------------------------------------------

@pytest.mark.parametrize(("cls", "data", "message"), [
    (TrainConfig, {"max_steps": 0}, "max_steps must be at least 1, or null for no limit"),
    (TrainConfig, {"max_steps": -3}, "max_steps must be at least 1"),
    (TrainConfig, {"max_steps_per_epoch": 0}, "max_steps_per_epoch must be at least 1"),
    (TrainConfig, {"seed": -1}, "seed must be >= 0"),
    (TrainConfig, {"max_grad_norm": float("nan")}, "max_grad_norm must be >= 0"),
    (OptimConfig, {"lr": -1.0e-3}, "lr must be > 0"),
    (OptimConfig, {"lr": 0.0}, "lr must be > 0"),
    (OptimConfig, {"betas": [0.9, 1.5]}, r"betas must be in \[0, 1\)"),
    (OptimConfig, {"weight_decay": -0.1}, "weight_decay must be >= 0"),
    (CheckpointConfig, {"every_n_steps": -1}, "every_n_steps must be >= 0"),
    (EarlyStoppingConfig, {"patience": -2}, "patience must be >= 0"),
    (TextDataConfig, {"max_train_samples": 0}, "max_train_samples must be >= 1"),
    (TextDataConfig, {"label_names": ["neg", "pos", "neg", "neutral"]}, "label_names repeats neg"),
    (ImageDataConfig, {"label_names": ["0", "1", "1"]}, "label_names repeats 1"),
    (ImageDataConfig, {"std": [0.5, 0.0, 0.5]}, "std must be > 0"),
])
def test_bad_numbers_and_repeated_labels_are_refused_at_load(cls, data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(cls, data)


def test_max_steps_zero_is_a_one_line_error_from_the_recipe(tiny_bert, sentiment_data, tmp_path):
    proc = run_recipe("text_classification",
                      *text_args(tiny_bert, sentiment_data, tmp_path / "run", "train.max_steps=0"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train: max_steps must be at least 1, or null for no limit" in proc.stderr
    assert not (tmp_path / "run").exists()


# --- 8. no absolute path of the builder in a bundle ------------------------------------------------------------

def test_bundle_and_report_carry_no_absolute_paths(serve_text_bundle, text_run):
    manifest = json.loads((serve_text_bundle / "manifest.json").read_text())
    text = json.dumps(manifest)
    for absolute in (str(text_run.resolve()), str(serve_text_bundle.resolve().parent), str(Path.home())):
        assert absolute not in text, f"{absolute} is in manifest.json"
    path = manifest["source_run"]["path"]
    assert not Path(path).is_absolute() and (serve_text_bundle / path).resolve() == text_run.resolve()
    from serve.sources import open_source

    assert open_source(serve_text_bundle).run_dir == text_run.resolve()  # the demo still finds the run


# --- 10. resume and output_dir errors are one line ---------------------------------------------------------------

def test_corrupt_train_state_on_resume_is_one_line(tiny_bert, sentiment_data, tmp_path):
    out = tmp_path / "run"
    run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out))
    (state,) = out.glob("checkpoints/step_*/train_state.json")
    state.write_text('{"global_step": 2, "epo')
    proc = run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out,
                                                        "checkpoint.resume_from=latest", "train.max_steps=3"),
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "train_state.json is corrupt" in proc.stderr and "checkpoint.resume_from" in proc.stderr
    (weights,) = out.glob("checkpoints/step_*/model.safetensors")
    state.write_text(json.dumps({"global_step": 2, "epoch": 0, "step_in_epoch": 2, "samples_seen": 16}))
    weights.write_bytes(b"not a safetensors file")
    proc = run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out,
                                                        "checkpoint.resume_from=latest", "train.max_steps=3"),
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot be loaded" in proc.stderr


def test_output_dir_that_is_a_file_is_one_line(tiny_bert, sentiment_data, tmp_path):
    out = tmp_path / "run.txt"
    out.write_text("mine")
    proc = run_recipe("text_classification", *text_args(tiny_bert, sentiment_data, out), check=False)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "mine"


def test_marker_is_written_by_every_recipe_run(text_run):
    assert (text_run / RUN_MARKER).is_file() and read_run_marker(text_run)["format"] == "tuneforge-run"
