"""Compress a finished run into a bundle of verified ONNX variants with a trade-off report.

    python recipes/compression.py --config recipes/configs/compress/text_default.yaml
    python recipes/compression.py --config recipes/configs/compress/mnist_cnn.yaml latency.threads=2
    python recipes/compression.py --config recipes/configs/compress/causal_lm.yaml run_dir=runs/causal_lm/mine
    python -m compress run --config recipes/configs/compress/text_default.yaml    # the same code, from the package
    python recipes/compression.py --help                                            # every config key with its default

The config names the run directory and lists the stages to apply, in order (compress/pipeline.py describes them):
`torch` measures the PyTorch baselines (fp32 eager, dynamic int8), `export` writes the parity-gated fp32 graphs,
`optimize` the ONNX Runtime-fused variant, and each `quantize` an int8 variant that must pass a numeric check against
fp32 and the task-metric gate (`gate.max_relative_drop`), retrying along a ladder of safer settings and recorded as
dropped when none passes. Then every variant is timed on the same inputs (`latency`), the fastest becomes the default,
and `out` receives the bundle with report.md, report.json and tradeoff.png. Nothing is written unless it all worked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compress.pipeline import CompressConfig, run_pipeline
from compress.training import ScriptTrainer
from finetune.config import parse_config
from finetune.errors import exit_on_user_error
from serve.bundle.manifest import Manifest

Config = CompressConfig  # run_dir, out, stages, data overrides, gate, latency, default_variant, report
RECIPES = Path(__file__).parent


def main(cfg: Config) -> Manifest:
    # Stages in order (checked before any work), then latency, the default variant and the report.
    manifest = run_pipeline(cfg, trainer=ScriptTrainer(RECIPES))  # prune recovery and distill run these recipes
    print((manifest.path / manifest.data["report"]["markdown"]).read_text() if "report" in manifest.data else "")
    rejected = manifest.data.get("rejected", {})
    print(f"wrote {Path(cfg.out)}: variants {', '.join(manifest.variants)} (default {manifest.default_variant})"
          + (f"; dropped {', '.join(rejected)}" if rejected else ""))
    return manifest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        main(parse_config(Config))
