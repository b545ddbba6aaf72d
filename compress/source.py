"""What compress reads from a run directory: the task metadata, the PyTorch model, its tokenizer, real samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import ExportError
from finetune.config import config_from_dict, yaml_load
from finetune.rundir import MODEL_DIR
from serve.bundle.errors import BundleError, TuneforgeError
from serve.bundle.records import RUN_RECORD, RunRecord, read_run_record
from serve.bundle.tasks import TEXT_TASKS, Task

logger = logging.getLogger(__name__)

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
    record: RunRecord  # model/tuneforge.json
    config: dict[str, Any] | None  # the resolved recipe config (config.yaml), when present
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # data splits, loaded once per run

    @property
    def task(self) -> Task:
        return self.record.task

    @property
    def seed(self) -> int:
        return int((self.config or {}).get("train", {}).get("seed", 42))


@dataclass
class Samples:
    """Real inputs for the parity gates: texts (and text pairs) or images, and where they came from."""

    source: str
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    images: list[Any] = field(default_factory=list)  # PIL images


def read_run(path: str | Path, *, data_overrides: dict[str, Any] | None = None) -> Run:
    """A run directory (or its `model/` folder) with a `tuneforge.json` naming a task this code exports.

    `data_overrides` replace keys of the recorded `data` config (an eval file that moved, `max_eval_samples`...):
    everything that reads the run's data (parity samples, eval metrics, calibration) sees them."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"run directory {path} does not exist; pass the train.output_dir of a finished run")
    model_dir = path if (path / RUN_RECORD).is_file() else path / MODEL_DIR
    if not (model_dir / RUN_RECORD).is_file():
        raise ExportError(f"{path} holds no {MODEL_DIR}/{RUN_RECORD}; pass the run directory of a finished recipe "
                          "run (its model/ folder is written at the first evaluation)")
    try:
        record = read_run_record(model_dir)
    except BundleError as err:
        raise ExportError(str(err)) from None
    run_dir = model_dir.parent if model_dir.name == MODEL_DIR else model_dir
    config_file = run_dir / "config.yaml"
    config = yaml_load(config_file.read_text(), source=str(config_file)) if config_file.is_file() else None
    if data_overrides:
        config = dict(config or {})
        config["data"] = {**(config.get("data") or {}), **data_overrides}
    return Run(run_dir=run_dir, model_dir=model_dir, record=record, config=config)


def load_model(run: Run, *, attn_implementation: str | None = "eager") -> Any:
    """The run's PyTorch model in eval mode, from safetensors. Attention in eager form by default: it exports to the
    plain MatMul/Softmax pattern that ONNX Runtime's transformer fusions recognise (sdpa exports without fusions);
    None keeps transformers' default (sdpa), the fastest eager PyTorch baseline."""
    import transformers

    from finetune.shapes import from_pretrained

    kwargs: dict[str, Any] = {"use_safetensors": True}
    if run.task == Task.IMAGE_CLASSIFICATION:
        loader = transformers.AutoModelForImageClassification
        import finetune.vision.architectures  # noqa: F401 - registers tuneforge's CNN and MLP with the Auto classes
    else:
        loader = (transformers.AutoModelForCausalLM if run.task == Task.CAUSAL_LM
                  else transformers.AutoModelForSequenceClassification)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
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
        if run.task == Task.IMAGE_CLASSIFICATION:
            images = [_open_image(g) for g in given[:limit]]
            return Samples(source=f"given ({len(images)} images)", images=images)
        texts = [g if isinstance(g, str) else g[0] for g in given[:limit]]
        pairs = [g[1] for g in given[:limit]] if not isinstance(given[0], str) else None
        return Samples(source=f"given ({len(texts)} texts)", texts=texts, pairs=pairs)
    image = run.task == Task.IMAGE_CLASSIFICATION
    try:
        samples = _eval_split_images(run, limit) if image else _eval_split_texts(run, limit)
    except (TuneforgeError, OSError, KeyError, TypeError) as err:
        logger.warning("cannot read the eval split of %s (%s); parity uses %s", run.run_dir, err,
                       "synthetic images" if image else "built-in texts")
        samples = None
    if samples is None:
        return _synthetic_images(run, limit) if image else Samples(source="built-in texts", texts=BUILTIN_TEXTS[:limit])
    return samples


def run_data_config(run: Run) -> tuple[Any, int] | None:
    """The run's text data settings (TextDataConfig, from config.yaml's `data`) and seed, or None without them."""
    from finetune.text.data import TextDataConfig

    data = (run.config or {}).get("data")
    if run.task not in TEXT_TASKS or not isinstance(data, dict) or "text_column" not in data:
        return None
    fields = set(TextDataConfig.__dataclass_fields__)
    cfg = config_from_dict(TextDataConfig, {k: v for k, v in data.items() if k in fields}, prefix="data.")
    return cfg, run.seed


def text_splits(run: Run) -> dict[str, Any] | None:
    """The run's raw text splits ({"train", "eval"}: `datasets.Dataset`s, as the recipe loaded them), loaded once;
    None when the run recorded no text data config."""
    from finetune.text.data import load_raw_splits

    found = run_data_config(run)
    if found is None:
        return None
    if "text_splits" not in run.cache:
        cfg, seed = found
        run.cache["text_splits"] = load_raw_splits(cfg, seed=seed)
    return run.cache["text_splits"]


def image_splits(run: Run) -> dict[str, Any] | None:
    """The run's image splits ({"train", "eval"}: ImageSets of loaded uint8 images with label ids, as the recipe
    loaded them), loaded once; None when the run recorded no image data config."""
    data = (run.config or {}).get("data")
    if run.task != Task.IMAGE_CLASSIFICATION or not isinstance(data, dict) or "train" not in data:
        return None
    if "image_splits" not in run.cache:
        from finetune.vision.data import ImageDataConfig, load_image_splits

        fields = set(ImageDataConfig.__dataclass_fields__)
        cfg = config_from_dict(ImageDataConfig, {k: v for k, v in data.items() if k in fields}, prefix="data.")
        splits, names = load_image_splits(cfg, seed=run.seed)
        recorded = run.record.label_names
        if recorded and list(names) != list(recorded):
            raise ExportError(f"the run's data gives labels {names}, its model was trained with {recorded}; "
                              "fix data.label_names (or the data overrides)")
        run.cache["image_splits"] = splits
    return run.cache["image_splits"]


def _eval_split_texts(run: Run, limit: int) -> Samples | None:
    """The first `limit` texts of the run's eval split."""
    found = run_data_config(run)
    splits = text_splits(run)
    if found is None or splits is None:
        return None
    cfg, _ = found
    evals = splits["eval"]
    rows = evals.select(range(min(limit, len(evals))))
    texts = [t if isinstance(t, str) else "" for t in rows[cfg.text_column]]
    pairs = [t if isinstance(t, str) else "" for t in rows[cfg.text_pair_column]] if cfg.text_pair_column else None
    return Samples(source=f"eval split ({len(texts)} of {len(evals)} rows)", texts=texts, pairs=pairs)


def _eval_split_images(run: Run, limit: int) -> Samples | None:
    """The first `limit` images of the run's eval split (uint8 arrays, as loaded; preprocessing comes later)."""
    splits = image_splits(run)
    if splits is None:
        return None
    evals = splits["eval"]
    count = min(limit, len(evals))
    return Samples(source=f"eval split ({count} of {len(evals)} images)", images=list(evals.images[:count]))


def _synthetic_images(run: Run, limit: int) -> Samples:
    """Seeded random images at the model's input size (for runs that recorded no data config)."""
    import numpy as np
    from PIL import Image

    spec = run.record.preprocessing
    height, width = spec["size"]
    rng = np.random.default_rng(0)
    mode = spec.get("color_mode", "RGB")
    shape = (height + 5, width + 3) if mode == "L" else (height + 5, width + 3, 3)  # off-size: resize is exercised
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(limit)]
    return Samples(source=f"synthetic ({limit} seeded random images)", images=images)


def _open_image(item: Any) -> Any:
    from PIL import Image

    return Image.open(item) if isinstance(item, str | Path) else item
