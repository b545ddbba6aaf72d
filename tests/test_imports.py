"""Import costs: training modules never pull in the export/serving stack; `import finetune` is cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

SUBMODULES = ["config", "data", "lm_data", "models", "lora", "generation", "optim", "metrics", "checkpoint",
              "evaluation", "tracking", "plots", "rundir", "errors"]
HEAVY_OPTIONAL = ["gradio", "onnxruntime", "onnx", "peft", "gguf"]


def modules_after(code: str) -> set[str]:
    """`sys.modules` of a fresh interpreter after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".", 1)[0] for name in modules}


def test_training_modules_do_not_import_export_or_serving_dependencies():
    lines = ["import finetune", *(f"import finetune.{m}" for m in SUBMODULES), "import compress",
             "import serve"]
    imports = "\n".join(lines)
    loaded = modules_after(imports)
    assert {f"finetune.{m}" for m in SUBMODULES} <= loaded  # the imports really ran
    assert "torch" in loaded  # sanity: the heavy training stack did load
    leaked = sorted(set(HEAVY_OPTIONAL) & top_level(loaded))
    assert not leaked, f"importing the training modules loaded {leaked}"


def test_import_finetune_is_cheap():
    loaded = top_level(modules_after("import finetune"))
    assert "finetune" in loaded
    for heavy in ("torch", "transformers", "datasets", "accelerate", *HEAVY_OPTIONAL):
        assert heavy not in loaded, f"`import finetune` imported {heavy}"
