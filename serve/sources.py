"""What the demo serves: bundles (each variant through the ONNX runtime) and run directories (through PyTorch), their
reports, and example inputs taken from the run's eval split where it can still be read.

Nothing here imports gradio; predictors load on first use (one per variant, shared by every user of the demo).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.batching import BatchingConfig
from serve.bundle.manifest import MANIFEST, Manifest, read_manifest
from serve.bundle.records import RUN_RECORD, RunRecord, read_run_record
from serve.bundle.tasks import Task
from serve.errors import ServeError

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
EXAMPLES = 6


@dataclass(eq=False)  # compared and hashed by identity: one Source per folder given
class Source:
    """A bundle or a run directory given on the command line."""

    path: Path
    kind: str  # "bundle" | "run"
    task: str
    labels: list[str] | None
    manifest: Manifest | None = field(default=None, repr=False)  # bundles
    record: RunRecord | None = field(default=None, repr=False)  # run directories: model/tuneforge.json

    @property
    def pair_column(self) -> str | None:
        """The column name of a text pair's second text, when the model takes pairs."""
        if self.manifest is not None:
            return self.manifest.text.text_pair_column
        return self.record.text_pair_column if self.record else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def variants(self) -> list[str]:
        """ONNX variants in manifest order (the default first); ["pytorch"] for a run directory."""
        if self.manifest is None:
            return ["pytorch"]
        names = list(self.manifest.variants)
        return [self.manifest.default_variant] + [n for n in names if n != self.manifest.default_variant]

    @property
    def run_dir(self) -> Path | None:
        """The run directory this source came from, if it still exists here."""
        if self.manifest is None:
            return self.path
        path = self.manifest.source_run_path
        return (self.path / path).resolve() if path and (self.path / path).is_dir() else None


def open_source(path: str | Path, *, verify: bool = True) -> Source:
    """A bundle (a folder with manifest.json) or a run directory (with model/tuneforge.json)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or not path.exists():
        manifest = read_manifest(path, verify=verify)
        return Source(path, "bundle", manifest.task, manifest.labels, manifest=manifest)
    task_file = next((p for p in (path / "model" / RUN_RECORD, path / RUN_RECORD) if p.is_file()), None)
    if task_file is None:
        raise ServeError(f"{path} is neither a bundle (no {MANIFEST}) nor a run directory (no model/{RUN_RECORD}); "
                         "pass a folder written by `python -m compress export` or a recipe's train.output_dir")
    record = read_run_record(task_file.parent)
    run_dir = task_file.parent.parent if task_file.parent.name == "model" else task_file.parent
    return Source(run_dir, "run", record.task, record.label_names, record=record)


class DemoModel:
    """One choice in the demo's variant selector: a bundle variant or a run's PyTorch model, loaded on first use."""

    def __init__(self, key: str, source: Source, variant: str, *, threads: int | None,
                 batching: BatchingConfig | None):
        self.key, self.source, self.variant = key, source, variant
        self.threads, self.batching = threads, batching
        self._predictor: Any = None
        self._lock = threading.Lock()

    @property
    def task(self) -> str:
        return self.source.task

    def predictor(self) -> Any:
        """The shared predictor (thread-safe; loaded once)."""
        with self._lock:
            if self._predictor is None:
                batching = self.batching if self.task != Task.CAUSAL_LM else None
                if self.source.manifest is None:
                    from serve.pytorch import load_run

                    self._predictor = load_run(self.source.path, threads=self.threads, batching=batching)
                else:
                    from serve.runtime import load

                    # The files were verified when the source was opened.
                    self._predictor = load(self.source.path, self.variant, threads=self.threads, batching=batching,
                                           verify=False)
                logger.info("loaded %s (%s)", self.key, self.task)
            return self._predictor

    def warm_up(self) -> None:
        """Load and run once, so the first user's latency is not the one-time set-up (allocations, PyTorch's first
        call) and variants compare fairly."""
        predictor = self.predictor()
        if self.task == Task.CAUSAL_LM:
            list(predictor.tokens("Hello", max_new_tokens=1, do_sample=False))
        elif self.task == Task.IMAGE_CLASSIFICATION:
            from PIL import Image

            predictor.predict([Image.new(predictor.spec.color_mode, predictor.spec.size[::-1])])
        else:
            predictor.predict(["warm up"], ["warm up"] if predictor.pair_column else None)


def demo_models(sources: list[Source], *, threads: int | None = None,
                batching: BatchingConfig | None = None) -> dict[str, list[DemoModel]]:
    """{task: models}; a model's key is its variant name, prefixed by its source's name when a task has several
    sources ("reviews/int8-dynamic", "default/pytorch")."""
    by_task: dict[str, list[DemoModel]] = {}
    for task in dict.fromkeys(s.task for s in sources):
        group = [s for s in sources if s.task == task]
        names = [s.name for s in group]
        if len(set(names)) < len(names):  # same folder name twice: use the parent too
            names = [f"{s.path.parent.name}/{s.name}" for s in group]
        by_task[task] = [DemoModel(v if len(group) == 1 else f"{name}/{v}", s, v, threads=threads, batching=batching)
                         for s, name in zip(group, names, strict=True) for v in s.variants]
    return by_task


def report_markdown(source: Source) -> str:
    """The bundle's report.md when it has one, else a table of its variants from the manifest (or a run's metrics)."""
    if source.manifest is None:
        metrics = source.record.eval if source.record else {}
        rows = [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if isinstance(v, int | float)]
        return "\n".join([f"**{source.name}** (run directory, PyTorch)", "", "| eval metric | value |", "|---|---|",
                          *rows]) if rows else f"**{source.name}**: no eval metrics recorded"
    report = source.path / REPORT_FILE
    if report.is_file():
        return report.read_text()
    lines = [f"**{source.name}** ({source.task}; default variant {source.manifest.default_variant})", "",
             "| variant | size (MB) | eval metrics | max abs diff vs PyTorch | sparsity |", "|---|---|---|---|---|"]
    for name, entry in source.manifest.variants.items():
        metrics = entry.get("metrics") or {}
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if isinstance(v, int | float)
                          and k in ("accuracy", "f1", "mse", "mae", "pearson", "eval_loss", "perplexity"))
        parity = entry.get("parity") or {}
        lines.append(f"| {name} | {entry.get('size_bytes', 0) / 1e6:.1f} | {shown or '-'} | "
                     f"{_fmt(parity.get('max_abs_diff'))} | {_fmt(entry.get('sparsity'))} |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def text_examples(source: Source, limit: int = EXAMPLES) -> list[list[str]]:
    """Texts (and pairs) from the run's eval split; built-in sentences when it cannot be read."""
    from compress.source import BUILTIN_TEXTS

    run_dir = source.run_dir
    if run_dir is not None:
        try:
            from compress.source import load_samples, read_run

            samples = load_samples(read_run(run_dir), limit=limit)
            texts = [t[:300] for t in samples.texts]
            return [[t, p] for t, p in zip(texts, samples.pairs, strict=True)] if samples.pairs else [[t] for t in
                                                                                                      texts]
        except Exception as err:  # examples are a nicety: never fail the demo
            logger.info("no examples from the eval split of %s (%s)", run_dir, err)
    return [[t] for t in BUILTIN_TEXTS[:limit]]


def image_examples(source: Source, folder: Path, limit: int = EXAMPLES) -> list[str]:
    """PNG files of eval images (one per class first, at their own size), written to `folder`; [] when the eval split
    cannot be read."""
    run_dir = source.run_dir
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return []
    try:
        import numpy as np
        from PIL import Image

        from compress.source import read_run
        from finetune.config import config_from_dict
        from finetune.vision.data import ImageDataConfig, load_image_splits

        run = read_run(run_dir)
        fields = ImageDataConfig.__dataclass_fields__
        cfg = config_from_dict(ImageDataConfig, {k: v for k, v in (run.config or {}).get("data", {}).items()
                                                 if k in fields}, prefix="data.")
        splits, _ = load_image_splits(cfg, seed=int((run.config or {}).get("train", {}).get("seed", 42)))
        evals = splits["eval"]
        first = {int(label): i for i, label in reversed(list(enumerate(evals.labels)))}  # first index of each class
        picks = (sorted(first.values()) + [i for i in range(len(evals)) if i not in first.values()])[:limit]
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in picks:
            image = evals.images[i]
            image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            path = folder / f"{source.name}-eval-{i}.png"
            image.save(path)
            paths.append(str(path))
        return paths
    except Exception as err:  # examples are a nicety: never fail the demo
        logger.info("no image examples from the eval split of %s (%s)", run_dir, err)
        return []
