"""Import costs: training modules never pull in the export/serving stack; `import finetune` is cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

SUBMODULES = ["config", "data", "lm_data", "models", "lora", "generation", "optim", "metrics", "checkpoint",
              "evaluation", "tracking", "plots", "rundir", "errors", "image_preprocessing", "image_data",
              "image_augment", "vision_models", "shapes"]
COMPRESS_SUBMODULES = ["manifest", "errors", "inputs", "decoding", "source", "export", "parity", "optimize", "tasks",
                       "bundle", "metric_gate", "quantize", "latency", "report", "pipeline", "units", "structured",
                       "sparsity", "prune", "distill", "launch", "run_data"]
# What serve.runtime may import (no torch, transformers or datasets).
TORCH_FREE = ["compress.manifest", "compress.inputs", "compress.decoding", "finetune.image_preprocessing",
              "serve.runtime", "serve.predictors", "serve.generation", "serve.batching", "serve.sketch"]
SERVE_SUBMODULES = ["errors", "batching", "predictors", "generation", "runtime", "pytorch", "sources", "sketch",
                    "login", "app"]
# evaluate imports transformers.pipelines (seconds per process): only finetune.metrics.load_metric imports it.
HEAVY_OPTIONAL = ["gradio", "onnxruntime", "onnx", "peft", "gguf", "evaluate"]


def modules_after(code: str) -> set[str]:
    """`sys.modules` of a fresh interpreter after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".", 1)[0] for name in modules}


def test_modules_do_not_import_export_or_serving_dependencies():
    lines = ["import finetune", *(f"import finetune.{m}" for m in SUBMODULES), "import compress",
             *(f"import compress.{m}" for m in COMPRESS_SUBMODULES), "import serve",
             *(f"import serve.{m}" for m in SERVE_SUBMODULES)]
    imports = "\n".join(lines)
    loaded = modules_after(imports)
    assert {f"finetune.{m}" for m in SUBMODULES} <= loaded  # the imports really ran
    assert {f"compress.{m}" for m in COMPRESS_SUBMODULES} <= loaded
    assert {f"serve.{m}" for m in SERVE_SUBMODULES} <= loaded
    assert "torch" in loaded  # sanity: the heavy training stack did load
    leaked = sorted(set(HEAVY_OPTIONAL) & top_level(loaded))
    assert not leaked, f"importing the training modules loaded {leaked}"
    assert "transformers.pipelines" not in loaded


def test_import_finetune_is_cheap():
    loaded = top_level(modules_after("import finetune"))
    assert "finetune" in loaded
    for heavy in ("torch", "transformers", "datasets", "accelerate", *HEAVY_OPTIONAL):
        assert heavy not in loaded, f"`import finetune` imported {heavy}"


def test_bundle_reading_modules_do_not_need_torch():
    """compress.manifest is standard library only; the input and decoding helpers add numpy, not torch."""
    baseline = top_level(modules_after(""))  # what interpreter start-up loads (site hooks, .pth finders)
    loaded = top_level(modules_after("import compress.manifest"))
    third_party = loaded - baseline - set(sys.stdlib_module_names) - {"finetune", "compress"}
    assert "compress" in loaded and not third_party, f"compress.manifest imported {sorted(third_party)}"
    loaded = top_level(modules_after("\n".join(f"import {m}" for m in TORCH_FREE)))
    assert "numpy" in loaded
    for heavy in ("torch", "transformers", "datasets", *HEAVY_OPTIONAL):
        assert heavy not in loaded, f"the torch-free compress modules imported {heavy}"
