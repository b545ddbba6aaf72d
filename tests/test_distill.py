"""Distillation: the KD loss by hand, students made of teacher layers, and recipes/distill.py run as users run it
(text: MiniLM-style layer subset; image: ResNet teacher -> simple CNN student)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TRAINER, run_recipe

from compress.bundle import export_bundle
from compress.distill import DistillConfig, distill_run, every_other_layer, kd_loss, layer_subset_student
from compress.errors import StageError
from compress.source import load_model, read_run
from finetune.shapes import shape_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_kd_loss_equals_a_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, -2.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    alpha, t = 0.3, 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    ce = -sum(math.log(softmax(s)[y]) for s, y in zip(student.tolist(), labels.tolist(), strict=True)) / 2
    kl = 0.0
    for s, te in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = softmax([v / t for v in te]), softmax([v / t for v in s])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = alpha * ce + (1 - alpha) * t * t * kl / 2  # KL summed over classes, averaged over the batch
    assert kd_loss(student, teacher, labels, alpha=alpha, temperature=t).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(student, teacher, labels, alpha=1.0, temperature=t).item() == pytest.approx(ce, rel=1e-6)
    assert kd_loss(student, student, labels, alpha=0.0, temperature=t).item() == pytest.approx(0.0, abs=1e-7)


def test_layer_subset_student_copies_the_chosen_teacher_layers():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=5, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3)).eval()
    assert every_other_layer(5) == [0, 2, 4] and every_other_layer(6) == [0, 2, 4]
    student = layer_subset_student(teacher, [1, 4])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert teacher.config.num_hidden_layers == 5 and len(teacher.bert.encoder.layer) == 5  # untouched
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith("bert.encoder.layer."):
            index, rest = key.split(".")[3], key.split(".", 4)[4]
            source = f"bert.encoder.layer.{[1, 4][int(index)]}.{rest}"
        else:  # embeddings, pooler and classifier are the teacher's
            source = key
        assert torch.equal(value, t_state[source]), key
    assert len(s_state) == len(t_state) - 3 * len([k for k in t_state if k.startswith("bert.encoder.layer.0.")])
    assert shape_record(student) is None  # what the config now describes is what it holds
    assert student(input_ids=torch.tensor([[1, 5, 7, 2]])).logits.shape == (1, 3)
    with pytest.raises(StageError, match=r"distinct teacher layers in 0\.\.4"):
        layer_subset_student(teacher, [0, 5])


def test_llama_student_keeps_a_working_kv_cache(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    student = layer_subset_student(teacher, [1])
    assert student.model.layers[0].self_attn.layer_idx == 0 and student.config.num_hidden_layers == 1
    ids = torch.tensor([[5, 6, 7, 8]])
    out = student.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    full = student(input_ids=out[:, :-1]).logits[0, -1].argmax()
    assert out[0, -1] == full  # the cached step agrees with a full forward


def read_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [e["train_loss"] for e in map(json.loads, lines) if "train_loss" in e]


@pytest.fixture(scope="module")
def teacher_run(tiny_bert: Path, sentiment_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text run trained long enough (96 steps) to be confident: its soft targets carry the task."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_recipe("text_classification", "--config", "recipes/configs/text_classification/default.yaml",
               f"model.name_or_path={tiny_bert}", f"data.train={sentiment_data['train']}",
               f"data.eval={sentiment_data['eval']}", "data.label_names=[negative, positive]",
               f"train.output_dir={out}", "train.batch_size=8", "train.epochs=8", "optim.lr=3.0e-3",
               "optim.warmup_ratio=0.0", "early_stopping.patience=0")
    return out


TEXT_ARGS = ["student.layers=[1]", "train.epochs=3", "train.batch_size=8", "train.log_every_n_steps=1",
             "optim.lr=3.0e-3", "optim.warmup_ratio=0.0", "early_stopping.patience=0"]


def test_text_distillation_from_the_shipped_yaml_lowers_the_loss(teacher_run: Path, tmp_path: Path):
    out = tmp_path / "student"
    run_recipe("distill", "--config", "recipes/configs/distill/default.yaml", f"teacher={teacher_run}",
               f"train.output_dir={out}", *TEXT_ARGS)
    losses = read_losses(out)
    assert len(losses) == 36
    # A confident teacher is matched within a few steps: the loss falls from its first value, then stays down.
    assert sum(losses[-6:]) / 6 < 0.85 * losses[0], losses
    meta = json.loads((out / "model" / "tuneforge.json").read_text())
    assert meta["task"] == "text-classification" and meta["label_names"] == ["negative", "positive"]
    record = meta["distillation"]
    assert record["student"] == {"teacher_layers": [1]} and record["alpha"] == 0.5 and record["temperature"] == 2.0
    assert record["teacher"] == teacher_run.name and meta["num_parameters"] < record["teacher_parameters"]
    student = load_model(read_run(out))
    assert student.config.num_hidden_layers == 1
    # config.yaml holds the teacher's data settings, resolved: export and pruning read the eval split from it.
    saved = (out / "config.yaml").read_text()
    assert "text_column: text" in saved and "label_column: sentiment" in saved
    assert json.loads((out / "metrics.json").read_text())["eval"]["num_examples"] == 17

    # The same run with the teacher's logits computed once gives the same student (no dropout, no augmentation).
    cached = distill_run(teacher_run, tmp_path / "cached", trainer=TRAINER, config=DistillConfig(
        cache_teacher_logits=True, overrides=TEXT_ARGS))
    assert read_losses(cached) == pytest.approx(losses, rel=1e-4, abs=1e-5)


def test_image_distillation_resnet_teacher_to_simple_cnn(resnet_run: Path, tmp_path: Path):
    out = distill_run(resnet_run, tmp_path / "cnn", trainer=TRAINER, config=DistillConfig(
        student_config={"conv_channels": [[4], [8]], "hidden_sizes": [16]}, max_steps=6, epochs=1,
        overrides=["augment.enabled=false", "train.batch_size=8", "train.eval_batch_size=8",
                   "train.log_every_n_steps=1"]))
    meta = json.loads((out / "model" / "tuneforge.json").read_text())
    teacher_meta = json.loads((resnet_run / "model" / "tuneforge.json").read_text())
    assert meta["architecture"] == "SimpleCNNForImageClassification" and meta["distillation"]["student"] == "simple_cnn"
    assert meta["preprocessing"] == teacher_meta["preprocessing"]  # the student sees what the teacher saw
    assert len(read_losses(out)) == 6
    manifest = export_bundle(out, tmp_path / "bundle")
    assert manifest.variants["fp32"]["parity"]["passed"]


def test_distill_refuses_a_regression_teacher(tmp_path: Path):
    run = tmp_path / "run" / "model"
    run.mkdir(parents=True)
    (run / "tuneforge.json").write_text(json.dumps({"task": "text-regression"}))
    with pytest.raises(StageError, match="distillation trains classifiers"):
        distill_run(tmp_path / "run", tmp_path / "out", trainer=TRAINER)
