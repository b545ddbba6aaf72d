"""Integrated gradients for run directories (compress.attribution, Captum): known answers on tiny PyTorch models whose
decision depends on one planted word or one image region, and the real run-directory path on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_image_run, make_tokenizer_dir

from compress.attribution import AttributionError, GradientExplainer
from serve.bundle.inputs import words_of
from serve.bundle.preprocessing import PreprocessingSpec
from serve.explain import deletion_insertion
from serve.pytorch import load_run

pytest.importorskip("captum", reason="pip install 'tuneforge[explain]'")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLANTED = "zesty"  # out of the test vocabulary: pieces z ##e ##s ##t ##y; the model keys on "z"
TEXT = "the movie was really good and it was quite nice but so zesty and the product fine"
REGION = (slice(1, 4), slice(5, 8))


class Bag(torch.nn.Module):
    """Embedding bag + bias, the shape of a transformers classifier (`.logits`, `get_input_embeddings`)."""

    def __init__(self, weights: np.ndarray, bias: list[float]):
        super().__init__()
        self.embedding = torch.nn.Embedding.from_pretrained(torch.from_numpy(weights), freeze=True)
        self.bias = torch.nn.Parameter(torch.tensor(bias), requires_grad=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embedding

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        pooled = (self.embedding(input_ids) * attention_mask[..., None]).sum(dim=1)
        return SimpleNamespace(logits=pooled + self.bias)


class Linear(torch.nn.Module):
    def __init__(self, weights: np.ndarray, bias: list[float]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(weights), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.tensor(bias), requires_grad=False)

    def forward(self, pixel_values):
        return SimpleNamespace(logits=pixel_values.flatten(1) @ self.weight + self.bias)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_integrated_gradients_put_the_planted_word_on_top(tokenizer):
    vocab = tokenizer.get_vocab()
    weights = np.random.default_rng(0).normal(0, 0.1, (len(vocab), 2)).astype(np.float32)
    weights[tokenizer.all_special_ids] = 0
    weights[vocab["z"]] = [0.0, 4.0]
    explainer = GradientExplainer(Bag(weights, [0.0, -2.0]).eval(), task="text-classification",
                                  labels=["negative", "positive"], tokenizer=tokenizer, max_length=64)
    why = explainer.explain(TEXT, steps=64)
    assert why.method == "integrated-gradients" and why.target == "positive" and why.score > 0.8
    assert why.words == [TEXT[s:e] for s, e in words_of(TEXT)] and why.top(1)[0][0] == PLANTED
    assert why.convergence_delta < 1e-2  # the path integral adds up to p(text) - p(all masked)
    negative = explainer.explain(TEXT, target="negative")
    assert negative.target_index == 0 and negative.attributions.argmin() == why.words.index(PLANTED)


def test_integrated_gradients_put_the_planted_region_on_top():
    shared = np.random.default_rng(1).normal(0, 0.5, (8, 8)).astype(np.float32)
    weights = np.stack([shared, shared], axis=-1)
    weights[REGION[0], REGION[1], 1] += 1.0
    spec = PreprocessingSpec(size=(8, 8), color_mode="L", mean=(0.5,), std=(0.5,))
    explainer = GradientExplainer(Linear(weights.reshape(64, 2), [0.0, -7.0]).eval(), task="image-classification",
                                  labels=["plain", "region"], spec=spec)
    image = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8)
    image[REGION] = 255
    why = explainer.explain(np.kron(image, np.ones((2, 3), np.uint8)), steps=64)
    assert why.target == "region" and why.attributions.shape == (8, 8) and why.heatmap.shape == (16, 24)
    top = set(np.argsort(-why.attributions.ravel())[:9])
    inside = np.zeros((8, 8), bool)
    inside[REGION] = True
    assert top == set(np.flatnonzero(inside))
    assert why.convergence_delta < 1e-2


def test_run_directories_text_and_image(tmp_path: Path, tokenizer):
    """The real path: a run's transformers model (a tiny random BERT / ResNet) through from_run, and the attributions
    measured for faithfulness on the same run's PyTorch predictor."""
    from transformers import BertConfig, BertForSequenceClassification

    model_dir = tmp_path / "text" / "model"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    (model_dir / "tuneforge.json").write_text(json.dumps({"task": "text-classification", "max_length": 32,
                                                          "label_names": ["negative", "positive"]}))
    why = GradientExplainer.from_run(tmp_path / "text").explain(TEXT, steps=16)
    assert len(why.words) == len(words_of(TEXT)) and np.isfinite(why.attributions).all()
    assert why.convergence_delta < 0.05
    result = deletion_insertion(load_run(tmp_path / "text"), TEXT, why)  # its target and word split are the bundle's
    assert len(result.fractions) == len(why.words) + 1

    run = make_image_run(tmp_path / "image")
    picture = np.random.default_rng(0).integers(0, 256, (30, 27, 3), dtype=np.uint8)
    why = GradientExplainer.from_run(run).explain(picture, steps=8)
    assert why.attributions.shape == (24, 20) and why.heatmap.shape == (30, 27) and why.target in ("cat", "dog", "fox")


def test_bad_input_gets_one_clear_line(tokenizer):
    explainer = GradientExplainer(Bag(np.zeros((len(tokenizer), 2), np.float32), [0.0, 0.0]),
                                  task="text-classification", labels=["a", "b"], tokenizer=tokenizer, max_length=64)
    for call, message in [(lambda: explainer.explain(""), "the text is empty"),
                          (lambda: explainer.explain("?!"), "has no words to explain"),
                          (lambda: explainer.explain(TEXT, steps=0), "steps must be a whole number of at least 1"),
                          (lambda: explainer.explain(TEXT, target="c"), "unknown target label 'c'")]:
        with pytest.raises(AttributionError, match=message):
            call()


def test_importing_the_module_loads_neither_captum_nor_torch():
    from test_imports import modules_after, top_level

    loaded = top_level(modules_after("import compress.attribution"))
    assert "compress" in loaded and not {"captum", "torch", "transformers"} & loaded
