"""Logging and metric tracking: a JSONL log always, TensorBoard when installed, both through accelerate."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from finetune.errors import FILE_ONLY

METRICS_LOG = "logs/metrics.jsonl"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONLTracker(GeneralTracker):
    """One JSON object per `log` call, `{"step": N, ...values}`, in `run_dir/logs/metrics.jsonl`.

    On resume from step N, entries after N (written by the interrupted run) are dropped, so the log reads as one run.
    """

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        super().__init__()
        self.path = Path(run_dir) / METRICS_LOG
        self.resume_step = resume_step
        self._file: Any = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")

    @property
    def tracker(self) -> Any:
        return self._file

    def store_init_configuration(self, values: dict) -> None:
        """The config is saved as config.yaml in the run directory; nothing to add here."""

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()


def build_trackers(run_dir: str | Path, *, resume_step: int | None) -> list[Any]:
    """The JSONL tracker, plus TensorBoard (written to run_dir/logs) when the package is installed."""
    trackers: list[Any] = [JSONLTracker(run_dir, resume_step)]
    if importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    return trackers


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Flatten a nested config to `a.b: scalar` (lists and None as strings), as TensorBoard's hparams need."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def read_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of `run_dir/logs/metrics.jsonl`, in order."""
    path = Path(run_dir) / METRICS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def setup_logging(*, is_main_process: bool) -> None:
    """INFO logs to stderr on the main process; warnings only elsewhere. `log_to_file` adds the run's train.log."""
    import datasets
    import transformers

    level = logging.INFO if is_main_process else logging.WARNING
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    logging.basicConfig(format=LOG_FORMAT, level=level, handlers=[console], force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save messages drown the run's own
    # Tied weights (an LM head sharing the embedding) warn at every checkpoint; saving them once is intended.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    if is_main_process:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
    if not is_main_process:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def log_to_file(run_dir: str | Path, *, is_main_process: bool) -> None:
    """Also log to run_dir/logs/train.log (main process), where an error that ends the run is recorded too."""
    if is_main_process:
        handler = logging.FileHandler(Path(run_dir) / "logs" / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
