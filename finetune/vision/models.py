"""Image classifiers: the baselines built here (simple_cnn, mlp, resnet) or a pretrained model, and its
preprocessing."""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import check_bounds
from finetune.errors import ModelError
from finetune.models import from_pretrained_checked, resolve_model_source

logger = logging.getLogger(__name__)

# Baselines built from scratch (random init), by name -> their config defaults beyond the class's own.
BUILTIN_IMAGE_MODELS: dict[str, dict[str, Any]] = {
    "simple_cnn": {},
    "mlp": {},
    # ResNet-18's layout; ResNetConfig's own defaults are ResNet-50's.
    "resnet": {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2],
               "layer_type": "basic"},
}


_SET_FROM_DATA = ("num_channels", "image_size", "num_labels", "id2label", "label2id")


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass
class ImageModelConfig:
    """Which image classifier: a baseline built here (random init) or a pretrained one to fine-tune."""

    name_or_path: str = "simple_cnn"  # simple_cnn, mlp or resnet (built here), a local folder, or a hub id
    # Settings of the model's config: for the built-in ones their architecture (e.g. {conv_channels: [32, 64],
    # hidden_sizes: [128]}, see finetune/vision/architectures.py and transformers' ResNetConfig); for a pretrained
    # model, config attributes to override.
    config: dict[str, Any] = field(default_factory=dict)
    num_labels: int | None = None  # default: the number of labels found in the data
    trust_remote_code: bool = False  # runs code from the model's repo: only for sources you trust

    def __post_init__(self) -> None:
        check_bounds(self, ">= 1", "num_labels")


def _image_config_class(name: str) -> Any:
    from transformers import ResNetConfig

    from finetune.vision.architectures import MLPConfig, SimpleCNNConfig

    return {"simple_cnn": SimpleCNNConfig, "mlp": MLPConfig, "resnet": ResNetConfig}[name]


def build_image_classifier(cfg: ImageModelConfig, *, label_names: list[str], num_channels: int,
                           image_size: list[int] | tuple[int, int]) -> Any:
    """An image classifier taking `pixel_values` [N, num_channels, *image_size] and returning `.loss`, `.logits`.

    Built-in names give a freshly initialised baseline (seeded by the caller); anything else loads pretrained
    weights (safetensors) with a new head for `label_names`.
    """
    import dataclasses

    from transformers import AutoModelForImageClassification

    import finetune.vision.architectures  # noqa: F401  (registers the baselines with the Auto classes)

    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}
    fixed = sorted(set(cfg.config) & set(_SET_FROM_DATA))
    if fixed:
        raise ModelError(f"model.config.{fixed[0]} is set from the data (data.color_mode, data.image_size, "
                         "the labels); remove it from model.config")
    if cfg.name_or_path in BUILTIN_IMAGE_MODELS:
        config_class = _image_config_class(cfg.name_or_path)
        known = [f.name for f in dataclasses.fields(config_class)]
        for key in cfg.config:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean model.config.{close[0]}?" if close else ""
                raise ModelError(f"{cfg.name_or_path} has no setting {key!r}{hint}")
        settings = {**BUILTIN_IMAGE_MODELS[cfg.name_or_path], **cfg.config, "num_channels": num_channels, **labels}
        if cfg.name_or_path != "resnet":  # ResNet pools globally: any input size
            settings["image_size"] = list(image_size)
        from huggingface_hub.errors import StrictDataclassError

        try:
            config = config_class(**settings)
        except (TypeError, ValueError, StrictDataclassError) as err:  # the strict config dataclasses' checks
            cause = err.__cause__ or err
            raise ModelError(f"invalid model.config for {cfg.name_or_path}: {' '.join(str(cause).split())}") from None
        return AutoModelForImageClassification.from_config(config)

    source = resolve_model_source(cfg.name_or_path)
    model = from_pretrained_checked(AutoModelForImageClassification, source, "model", ignore_mismatched_sizes=True,
                             trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **labels, **cfg.config)
    expected = getattr(model.config, "num_channels", num_channels)
    if expected != num_channels:
        raise ModelError(f"{cfg.name_or_path} takes {expected}-channel images but the data gives {num_channels}; "
                         f"set data.color_mode={'RGB' if expected == 3 else 'L'}")
    return model


def pretrained_preprocessing(cfg: ImageModelConfig) -> dict[str, Any] | None:
    """The preprocessing a pretrained image model was trained with, as PreprocessingSpec fields (any subset).

    From a tuneforge run's `tuneforge.json`, else the model's `preprocessor_config.json`; None for built-ins.
    """
    if cfg.name_or_path in BUILTIN_IMAGE_MODELS:
        return None
    source = resolve_model_source(cfg.name_or_path)
    task_file = Path(source) / "tuneforge.json"
    if task_file.is_file():
        spec = json.loads(task_file.read_text()).get("preprocessing")
        if spec:
            return spec
    from transformers import AutoConfig
    from transformers.image_processing_base import ImageProcessingMixin

    import finetune.vision.architectures  # noqa: F401  (registers the baselines with the Auto classes)

    out: dict[str, Any] = {}
    config = from_pretrained_checked(AutoConfig, source, "model config", trust_remote_code=cfg.trust_remote_code)
    channels = getattr(config, "num_channels", None)
    if channels in (1, 3):
        out["color_mode"] = "L" if channels == 1 else "RGB"
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError):
        logger.warning("%s has no image processor config; preprocessing comes from data.* and the data", source)
        return out
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if isinstance(size, dict) and "height" in size:
        out["size"] = [size["height"], size["width"]]
    elif isinstance(size, dict) and "shortest_edge" in size:
        out["size"] = [size["shortest_edge"]] * 2
    if processor.get("do_normalize", True) and "image_mean" in processor:
        out["mean"], out["std"] = list(processor["image_mean"]), list(processor["image_std"])
    if processor.get("resample") in _PIL_RESAMPLE:
        out["resample"] = _PIL_RESAMPLE[processor["resample"]]
    if processor.get("do_rescale", True) and "rescale_factor" in processor:
        out["rescale"] = float(processor["rescale_factor"])
    return out
