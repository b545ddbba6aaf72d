"""finetune.vision.architectures and finetune.models.build_image_classifier: baselines as transformers models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageClassification, ResNetForImageClassification

from finetune.errors import ModelError
from finetune.vision.architectures import (
    MLPConfig,
    MLPForImageClassification,
    SimpleCNNConfig,
    SimpleCNNForImageClassification,
)
from finetune.vision.models import ImageModelConfig, build_image_classifier, pretrained_preprocessing

LABELS = ["bar", "column", "box"]


def build(name: str, channels: int = 1, size=(12, 12), **config):
    torch.manual_seed(0)
    return build_image_classifier(ImageModelConfig(name_or_path=name, config=config), label_names=LABELS,
                                  num_channels=channels, image_size=size)


@pytest.mark.parametrize(("name", "cls", "config"), [
    ("simple_cnn", SimpleCNNForImageClassification, {"conv_channels": [[4, 4], 8], "hidden_sizes": [16]}),
    ("mlp", MLPForImageClassification, {"hidden_sizes": [32, 16]}),
    ("resnet", ResNetForImageClassification, {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}),
])
def test_builtins_train_save_and_reload_with_identical_logits(tmp_path, name, cls, config):
    model = build(name, channels=3, **config)
    assert isinstance(model, cls) and model.config.id2label == dict(enumerate(LABELS))
    x, y = torch.randn(5, 3, 12, 12), torch.tensor([0, 1, 2, 0, 1])
    out = model(pixel_values=x, labels=y)
    assert out.logits.shape == (5, 3) and out.loss.ndim == 0
    out.loss.backward()  # one step, so BatchNorm statistics and weights differ from a fresh init
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    model.eval()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is cls
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_cnn_is_a_plain_stack_described_by_its_config(tmp_path):
    model = build("simple_cnn", conv_channels=[[6], [5, 7]], hidden_sizes=[9], batch_norm=True)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [6, 5, 7]
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7 * 3 * 3, 9), (9, 3)]
    # A pruned model is a config with smaller widths: its state dict has those shapes.
    pruned = SimpleCNNConfig(**{**model.config.to_dict(), "conv_channels": [[3], [2, 4]]})
    small = SimpleCNNForImageClassification(pruned)
    small.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert weights["features.0.weight"].shape == (3, 1, 3, 3) and weights["classifier.2.weight"].shape == (9, 36)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "tuneforge-simple-cnn" and saved["conv_channels"] == [[3], [2, 4]]
    assert AutoConfig.from_pretrained(tmp_path).conv_channels == [[3], [2, 4]]
    mlp = MLPForImageClassification(MLPConfig(num_labels=4, image_size=[5, 6], num_channels=2, hidden_sizes=[7]))
    assert [m.in_features for m in mlp.classifier if isinstance(m, torch.nn.Linear)] == [60, 7]


@pytest.mark.parametrize(("name", "config", "message"), [
    ("simple_cnn", {"conv_chanels": [8]}, "simple_cnn has no setting 'conv_chanels'; did you mean "
                                          "model.config.conv_channels?"),
    ("mlp", {"num_channels": 3}, "model.config.num_channels is set from the data"),
    ("simple_cnn", {"conv_channels": [8, 8, 8, 8, 8]}, "shrink a 12x12 image to nothing"),
    ("mlp", {"hidden_sizes": "wide"}, "invalid model.config for mlp"),
    ("resnet", {"layer_type": "huge"}, "layer_type=huge is not one of"),
])
def test_bad_model_settings_raise_model_errors(name, config, message):
    with pytest.raises(ModelError, match=message):
        build(name, **config)


def test_pretrained_local_folder_gets_a_new_head_and_keeps_the_body(tmp_path):
    source = build("simple_cnn", conv_channels=[4], hidden_sizes=[8])
    source.save_pretrained(tmp_path)
    (tmp_path / "tuneforge.json").write_text(json.dumps({"preprocessing": {"size": [12, 12], "color_mode": "L",
                                                                            "mean": [0.1], "std": [0.3]}}))
    cfg = ImageModelConfig(name_or_path=str(tmp_path))
    assert pretrained_preprocessing(cfg)["mean"] == [0.1]
    assert pretrained_preprocessing(ImageModelConfig()) is None
    model = build_image_classifier(cfg, label_names=["a", "b", "c", "d"], num_channels=1, image_size=(12, 12))
    assert model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert model.classifier[-1].out_features == 4
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    with pytest.raises(ModelError, match=r"takes 1-channel images but the data gives 3; set data\.color_mode=L"):
        build_image_classifier(cfg, label_names=LABELS, num_channels=3, image_size=(12, 12))
    with pytest.raises(ModelError, match="does not exist"):
        build_image_classifier(ImageModelConfig(name_or_path="/nonexistent/model"), label_names=LABELS,
                               num_channels=1, image_size=(12, 12))


def test_preprocessing_from_a_transformers_image_processor_config(tmp_path):
    build("resnet", channels=3, embedding_size=8, hidden_sizes=[8], depths=[1]).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    spec = pretrained_preprocessing(ImageModelConfig(name_or_path=str(tmp_path)))
    assert spec == {"color_mode": "RGB", "size": [32, 32], "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225], "resample": "bicubic", "rescale": 0.00392156862745098}
