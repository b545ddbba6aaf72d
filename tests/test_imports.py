"""Import costs: training modules never pull in the export/serving stack; `import finetune` is cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO
from test_layering import floor, modules

# evaluate imports transformers.pipelines (seconds per process): only finetune.metrics.load_metric imports it.
HEAVY_OPTIONAL = ["gradio", "onnxruntime", "onnx", "peft", "gguf", "evaluate", "fastapi", "uvicorn", "ray"]
# Found by folder, so a new module is covered: the bundle floor and the runtime (everything in serve/ but the demo).
TORCH_FREE = sorted(name for name in modules() if floor(name) in ("bundle", "runtime") and name != "serve.__main__")
# finetune.metric_modules is evaluate's side of load_metric, imported only by it.
# The server's modules (serve.http, serve.ray) exist to run the web stack: they import it at the top.
ALL = sorted(name for name in modules() if not name.endswith("__main__") and name != "finetune.metric_modules"
             and floor(name) != "server")


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
    loaded = modules_after("\n".join(f"import {m}" for m in ALL))
    assert set(ALL) <= loaded and len(ALL) > 50  # the imports really ran
    assert "torch" in loaded  # sanity: the heavy training stack did load
    leaked = sorted(set(HEAVY_OPTIONAL) & top_level(loaded))
    assert not leaked, f"importing the modules loaded {leaked}"
    assert "transformers.pipelines" not in loaded


def test_import_finetune_is_cheap():
    loaded = top_level(modules_after("import finetune"))
    assert "finetune" in loaded
    for heavy in ("torch", "transformers", "datasets", "accelerate", *HEAVY_OPTIONAL):
        assert heavy not in loaded, f"`import finetune` imported {heavy}"


def test_bundle_and_runtime_modules_do_not_need_torch():
    """serve.bundle.manifest is standard library only; the bundle floor and the runtime add numpy, never torch."""
    baseline = top_level(modules_after(""))  # what interpreter start-up loads (site hooks, .pth finders)
    loaded = top_level(modules_after("import serve.bundle.manifest"))
    third_party = loaded - baseline - set(sys.stdlib_module_names) - {"serve"}
    assert "serve" in loaded and not third_party, f"serve.bundle.manifest imported {sorted(third_party)}"
    assert "serve.runtime" in TORCH_FREE and "serve.bundle.preprocessing" in TORCH_FREE
    loaded = top_level(modules_after("\n".join(f"import {m}" for m in TORCH_FREE)))
    assert "numpy" in loaded
    for heavy in ("torch", "transformers", "datasets", "finetune", "compress", *HEAVY_OPTIONAL):
        assert heavy not in loaded, f"the torch-free modules imported {heavy}"
