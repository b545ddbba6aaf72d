"""What compress reads from a run directory: the task metadata, the PyTorch model, its tokenizer, real samples."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import ExportError
from compress.manifest import TASKS
from finetune.config import config_from_dict, yaml_load
from finetune.errors import TuneforgeError
from finetune.rundir import MODEL_DIR, TASK_FILE

logger = logging.getLogger(__name__)

TEXT_TASKS = ("text-classification", "text-regression")
# Parity inputs when a run has no readable eval split: varied lengths, plain English.
BUILTIN_TEXTS = [
    "It works.",
    "The service was quick and the staff were friendly.",
    "I would not buy this again: it broke after two days and support never answered my emails.",
    "Once upon a time there was a small town by the sea.",
    "What is the capital of France?",
    "The results were mixed, but the second half of the season was much better than the first.",
    "Short one.",
    "Please summarise the following paragraph in one sentence, keeping the names and the dates exactly as written.",
]


@dataclass
class Run:
    """A run directory's `model/` folder and what the recipe recorded about it."""

    run_dir: Path
    model_dir: Path
    meta: dict[str, Any]  # model/tuneforge.json
    config: dict[str, Any] | None  # the resolved recipe config (config.yaml), when present

    @property
    def task(self) -> str:
        return self.meta["task"]


@dataclass
class Samples:
    """Real inputs for the parity gates: texts (and text pairs) or images, and where they came from."""

    source: str
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    images: list[Any] = field(default_factory=list)  # PIL images


def read_run(path: str | Path) -> Run:
    """A run directory (or its `model/` folder) with a `tuneforge.json` naming a task this code exports."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"run directory {path} does not exist; pass the train.output_dir of a finished run")
    model_dir = path if (path / TASK_FILE).is_file() else path / MODEL_DIR
    if not (model_dir / TASK_FILE).is_file():
        raise ExportError(f"{path} holds no {MODEL_DIR}/{TASK_FILE}; pass the run directory of a finished recipe run "
                          "(its model/ folder is written at the first evaluation)")
    meta = json.loads((model_dir / TASK_FILE).read_text())
    if meta.get("task") not in TASKS:
        raise ExportError(f"{model_dir / TASK_FILE} names task {meta.get('task')!r}; compress exports "
                          f"{', '.join(TASKS)}")
    run_dir = model_dir.parent if model_dir.name == MODEL_DIR else model_dir
    config_file = run_dir / "config.yaml"
    config = yaml_load(config_file.read_text(), source=str(config_file)) if config_file.is_file() else None
    return Run(run_dir=run_dir, model_dir=model_dir, meta=meta, config=config)


def load_model(run: Run) -> Any:
    """The run's PyTorch model in eval mode, from safetensors; attention in eager form, which exports to the plain
    MatMul/Softmax pattern that ONNX Runtime's transformer fusions recognise (sdpa exports without fusions)."""
    import transformers

    from finetune.shapes import from_pretrained

    kwargs: dict[str, Any] = {"use_safetensors": True}
    if run.task == "image-classification":
        loader = transformers.AutoModelForImageClassification
        import finetune.vision_models  # noqa: F401 - registers tuneforge's CNN and MLP with the Auto classes
    else:
        loader = (transformers.AutoModelForCausalLM if run.task == "causal-lm"
                  else transformers.AutoModelForSequenceClassification)
        kwargs["attn_implementation"] = "eager"
    try:
        model = from_pretrained(loader, run.model_dir, **kwargs)  # pruned models too
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"cannot load the {run.task} model in {run.model_dir}: {str(err).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


def load_tokenizer(run: Run) -> Any:
    """The run's fast tokenizer (text tasks and causal LMs)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"the tokenizer in {run.model_dir} is not a fast tokenizer; bundles need tokenizer.json "
                          "(save the run with a *TokenizerFast)")
    return tokenizer


def load_samples(run: Run, *, limit: int, given: list[Any] | None = None) -> Samples:
    """Up to `limit` parity inputs: `given` ones, else the run's eval split, else built-in texts / synthetic images."""
    if given:
        if run.task == "image-classification":
            images = [_open_image(g) for g in given[:limit]]
            return Samples(source=f"given ({len(images)} images)", images=images)
        texts = [g if isinstance(g, str) else g[0] for g in given[:limit]]
        pairs = [g[1] for g in given[:limit]] if not isinstance(given[0], str) else None
        return Samples(source=f"given ({len(texts)} texts)", texts=texts, pairs=pairs)
    if run.task == "image-classification":
        return _synthetic_images(run, limit)
    try:
        samples = _eval_split_texts(run, limit)
    except (TuneforgeError, OSError, KeyError, TypeError) as err:
        logger.warning("cannot read the eval split of %s (%s); parity uses built-in texts", run.run_dir, err)
        samples = None
    if samples is None:
        return Samples(source="built-in texts", texts=BUILTIN_TEXTS[:limit])
    return samples


def run_data_config(run: Run) -> tuple[Any, int] | None:
    """The run's text data settings (TextDataConfig, from config.yaml's `data`) and seed, or None without them."""
    from finetune.data import TextDataConfig

    data = (run.config or {}).get("data")
    if not isinstance(data, dict) or "text_column" not in data:
        return None
    fields = set(TextDataConfig.__dataclass_fields__)
    cfg = config_from_dict(TextDataConfig, {k: v for k, v in data.items() if k in fields}, prefix="data.")
    return cfg, int((run.config or {}).get("train", {}).get("seed", 42))


def _eval_split_texts(run: Run, limit: int) -> Samples | None:
    """The first `limit` texts of the run's eval split."""
    from finetune.data import load_raw_splits

    found = run_data_config(run)
    if found is None:
        return None
    cfg, seed = found
    evals = load_raw_splits(cfg, seed=seed)["eval"]
    rows = evals.select(range(min(limit, len(evals))))
    texts = [t if isinstance(t, str) else "" for t in rows[cfg.text_column]]
    pairs = [t if isinstance(t, str) else "" for t in rows[cfg.text_pair_column]] if cfg.text_pair_column else None
    return Samples(source=f"eval split ({len(texts)} of {len(evals)} rows)", texts=texts, pairs=pairs)


def _synthetic_images(run: Run, limit: int) -> Samples:
    """Seeded random images at the model's input size (no eval split reader for images yet)."""
    import numpy as np
    from PIL import Image

    spec = run.meta["preprocessing"]
    height, width = spec["size"]
    rng = np.random.default_rng(0)
    mode = spec.get("color_mode", "RGB")
    shape = (height + 5, width + 3) if mode == "L" else (height + 5, width + 3, 3)  # off-size: resize is exercised
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(limit)]
    return Samples(source=f"synthetic ({limit} seeded random images)", images=images)


def _open_image(item: Any) -> Any:
    from PIL import Image

    return Image.open(item) if isinstance(item, str | Path) else item
