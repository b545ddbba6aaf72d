"""The main job (recipes/quickstart.py): fine-tune, compress, report and the demo command, end to end on a tiny BERT."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from conftest import run_recipe

from serve.bundle.manifest import read_manifest


def test_quickstart_trains_compresses_and_prints_the_demo_command(tiny_bert: Path, sentiment_data: dict[str, Path],
                                                                   tmp_path: Path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train = [f"model.name_or_path={tiny_bert}", f"data.train={sentiment_data['train']}",
             f"data.eval={sentiment_data['eval']}", "data.label_names=[negative, positive]", "train.batch_size=8",
             "train.max_steps=4", "optim.lr=3.0e-3"]
    # 17 eval rows: one flipped prediction is a 6% drop, so the tiny run gets a looser gate than the YAML's 1%.
    compress = ["latency.runs=6", "latency.rounds=2", "latency.warmup=1", "gate.max_relative_drop=0.2"]
    places = [f"run_dir={run}", f"bundle={bundle}"]
    proc = run_recipe("quickstart", *places, f"train_overrides={json.dumps(train)}",
                      f"compress_overrides={json.dumps(compress)}", timeout=600)
    manifest = read_manifest(bundle)
    assert (run / "model" / "model.safetensors").is_file()
    assert (bundle / manifest.data["source_run"]["path"]).resolve() == run.resolve()
    assert {"fp32", "optimized", "int8-dynamic"} <= set(manifest.variants)
    report = (bundle / "report.md").read_text()
    assert report.strip().splitlines()[0] in proc.stdout  # the report table is printed
    demo = proc.stdout.split("open the demo:\n", 1)[1].strip().splitlines()[0]
    assert shlex.split(demo)[1:] == ["-m", "serve", str(bundle)]
    assert json.loads((run / "metrics.json").read_text())["eval"]["accuracy"] >= 0

    # Run again: the finished run is kept, and the error says how to pass the fix through quickstart.
    again = run_recipe("quickstart", *places, f"train_overrides={json.dumps(train)}", check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert "train.overwrite=true" in again.stderr and "train_overrides='[key=value,...]'" in again.stderr
    assert (run / "model" / "model.safetensors").is_file()
