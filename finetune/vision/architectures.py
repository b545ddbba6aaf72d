"""Baseline image classifiers as transformers models: a small CNN and an MLP.

Both are `PreTrainedModel`s with their own config, so they save and load with save_pretrained / from_pretrained
(safetensors, config.json that rebuilds them) and take the same call as ResNetForImageClassification:
`model(pixel_values=[N, C, H, W] float32, labels=[N] optional) -> ImageClassifierOutput(loss, logits)`.
Importing this module registers them with AutoConfig and AutoModelForImageClassification.

The layers are plain stacks whose widths all come from the config (`conv_channels`, `hidden_sizes`), so a pruned
model is described by its config with smaller widths. (No `from __future__ import annotations` here: the strict
config dataclasses check field types from real annotations.)
"""

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput


@strict
class SimpleCNNConfig(PreTrainedConfig):
    r"""A convnet: blocks of (3x3 conv -> batch norm -> ReLU) x len(block) -> 2x2 max-pool, then flatten ->
    dropout -> (linear -> ReLU -> dropout) per hidden size -> linear.

    conv_channels: output channels of every conv, one list per block, e.g. [[32, 32], [64]]; a plain number is a
    block of one conv ([32, 64] == [[32], [64]]).
    """

    model_type = "tuneforge-simple-cnn"

    num_channels: int = 1
    image_size: list[int] | tuple[int, int] = (28, 28)  # (height, width) of the input
    conv_channels: list[list[int] | int] | tuple[tuple[int, ...] | int, ...] = ((32,), (64,))
    kernel_size: int = 3
    batch_norm: bool = True
    hidden_sizes: list[int] | tuple[int, ...] = (128,)
    conv_dropout: float | int = 0.25  # before the first linear layer
    dropout: float | int = 0.5  # after each hidden linear layer

    def __post_init__(self, **kwargs):
        self.image_size = list(self.image_size)
        self.conv_channels = [[block] if isinstance(block, int) else list(block) for block in self.conv_channels]
        self.hidden_sizes = list(self.hidden_sizes)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Every block needs at least one conv, and the image must survive the pooling."""
        if not self.conv_channels or any(not block for block in self.conv_channels):
            raise ValueError(f"conv_channels needs at least one block of at least one conv, got {self.conv_channels}")
        height, width = self.feature_size
        if min(height, width) < 1:
            raise ValueError(f"{len(self.conv_channels)} pooling blocks shrink a {self.image_size[0]}x"
                             f"{self.image_size[1]} image to nothing; use fewer blocks or larger images")

    @property
    def feature_size(self) -> tuple[int, int]:
        """(height, width) after the conv blocks: each 2x2 max-pool halves the size, rounding down."""
        scale = 2 ** len(self.conv_channels)
        return self.image_size[0] // scale, self.image_size[1] // scale


@strict
class MLPConfig(PreTrainedConfig):
    r"""A multilayer perceptron: flatten -> (linear -> ReLU -> dropout) per hidden size -> linear."""

    model_type = "tuneforge-mlp"

    num_channels: int = 1
    image_size: list[int] | tuple[int, int] = (28, 28)
    hidden_sizes: list[int] | tuple[int, ...] = (128,)
    dropout: float | int = 0.2

    def __post_init__(self, **kwargs):
        self.image_size = list(self.image_size)
        self.hidden_sizes = list(self.hidden_sizes)
        super().__post_init__(**kwargs)


class _BaselinePreTrainedModel(PreTrainedModel):
    """Weight init and the input name shared by both baselines."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default layer initialisation (what the classic MNIST baselines train from), through
        # transformers' init functions, which leave weights loaded by from_pretrained alone.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())  # 1 / sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def _output(self, logits: torch.Tensor, labels: torch.Tensor | None) -> ImageClassifierOutput:
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def _head(in_features: int, hidden_sizes: list[int], num_labels: int, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [nn.Linear(in_features, size), nn.ReLU(), nn.Dropout(dropout)]
        in_features = size
    return [*layers, nn.Linear(in_features, num_labels)]


class SimpleCNNForImageClassification(_BaselinePreTrainedModel):
    """`features` (the conv blocks, [N, C, H, W] -> [N, C', H', W']) then `classifier` (flatten -> logits)."""

    config_class = SimpleCNNConfig
    base_model_prefix = "features"

    def __init__(self, config: SimpleCNNConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        in_channels = config.num_channels
        for block in config.conv_channels:
            for out_channels in block:
                layers += [nn.Conv2d(in_channels, out_channels, config.kernel_size, padding=config.kernel_size // 2,
                                     bias=not config.batch_norm)]
                layers += [nn.BatchNorm2d(out_channels)] if config.batch_norm else []
                layers += [nn.ReLU()]
                in_channels = out_channels
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        height, width = config.feature_size
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(config.conv_dropout),
                                        *_head(in_channels * height * width, config.hidden_sizes,
                                               config.num_labels, config.dropout))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs: object) -> ImageClassifierOutput:
        return self._output(self.classifier(self.features(pixel_values)), labels)


class MLPForImageClassification(_BaselinePreTrainedModel):
    """`classifier`: flatten [N, C, H, W] -> [N, C*H*W], hidden layers, logits."""

    config_class = MLPConfig
    base_model_prefix = "classifier"

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        in_features = config.num_channels * config.image_size[0] * config.image_size[1]
        self.classifier = nn.Sequential(nn.Flatten(), *_head(in_features, config.hidden_sizes, config.num_labels,
                                                             config.dropout))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs: object) -> ImageClassifierOutput:
        return self._output(self.classifier(pixel_values), labels)


for _config, _model in ((SimpleCNNConfig, SimpleCNNForImageClassification), (MLPConfig, MLPForImageClassification)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForImageClassification.register(_config, _model, exist_ok=True)
