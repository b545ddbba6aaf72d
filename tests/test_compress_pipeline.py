"""The compress pipeline: the recipe from a shipped YAML end to end, the report against the manifest, the stage plan,
run-to-run stages, and the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, TRAINER, run_recipe

from compress.latency import LatencyConfig
from compress.metric_gate import GateConfig
from compress.pipeline import STAGES, CompressConfig, StageKind, plan_stages, run_pipeline, transform_stage
from finetune.config import load_config
from finetune.errors import ConfigError
from serve.bundle.manifest import read_manifest, sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = REPO / "recipes" / "configs" / "compress"
QUICK = ["latency.runs=6", "latency.rounds=2", "latency.warmup=1"]


@pytest.fixture(scope="module")
def recipe_bundle(text_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """bundles/text_default's stages (torch baselines, export, optimize, dynamic and static int8) on the tiny run."""
    out = tmp_path_factory.mktemp("pipeline") / "bundle"
    # 17 eval rows: one flipped prediction is a 6% drop, so the tiny run gets a looser gate than the YAML's 1%.
    proc = run_recipe("compression", "--config", str(CONFIGS / "text_default.yaml"), f"run_dir={text_run}",
                      f"out={out}", *QUICK, "gate.max_relative_drop=0.2")
    return out, proc.stdout


def test_recipe_writes_a_verified_bundle_with_every_stage(recipe_bundle: tuple[Path, str], text_run: Path):
    out, stdout = recipe_bundle
    manifest = read_manifest(out)  # every file's sha256, the report's included
    data = manifest.data
    assert list(manifest.variants) == ["fp32", "optimized", "int8-dynamic", "int8-static"]
    assert {"report.md", "report.json", "tradeoff.png"} <= data["files"].keys()
    for name, digest in data["files"].items():
        assert sha256_file(out / name) == digest
    assert not list(out.parent.glob(".*")), "no temp or work folder is left next to the bundle"

    dynamic, static = manifest.variants["int8-dynamic"], manifest.variants["int8-static"]
    assert dynamic["parent"] == "optimized" and dynamic["quantization"]["source"] == "optimized"
    assert dynamic["quantization"]["format"] == "QOperator" and dynamic["quantization"]["calibration"] is None
    assert static["parent"] == "fp32" and static["quantization"]["format"] == "QDQ"
    assert static["quantization"]["calibration"] == {"method": "percentile", "samples": 96, "percentile": 99.999,
                                                     "source": "train split (96 of 96 rows)"}
    for variant in (dynamic, static):
        assert variant["metric_gate"]["passed"] and variant["metric_gate"]["reference"] == "fp32"
        assert variant["parity"]["reference"] == "fp32" and variant["parity"]["atol"] == 1.0
        assert variant["session"]["disabled_optimizers"] == ["SkipLayerNormFusion", "BiasGeluFusion"]
    # PyTorch and every graph score the same eval split with the same code: fp32 agrees with the run's own eval.
    baselines = data["compress"]["baselines"]
    assert baselines.keys() == {"torch-fp32", "torch-int8-dynamic"}
    accuracy = data["source_run"]["eval"]["accuracy"]
    fp32 = manifest.variants["fp32"]
    assert baselines["torch-fp32"]["metrics"]["accuracy"] == fp32["metrics"]["accuracy"] == accuracy
    assert baselines["torch-fp32"]["size_bytes"] == (text_run / "model" / "model.safetensors").stat().st_size
    # The default is the fastest variant at batch 1.
    p50 = {name: v["latency"]["batch_1"]["p50_ms"] for name, v in manifest.variants.items()}
    assert manifest.default_variant == min(p50, key=p50.get)
    assert f"wrote {out}" in stdout and "| variant | runtime | accuracy |" in stdout


def test_report_rows_match_the_manifest(recipe_bundle: tuple[Path, str]):
    out, _ = recipe_bundle
    data = read_manifest(out).data
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["torch-fp32", "torch-int8-dynamic", "fp32", "optimized", "int8-dynamic", "int8-static"]
    reference = rows["torch-fp32"]
    for name, row in rows.items():
        source = data["compress"]["baselines"].get(name) or data["variants"][name]
        assert row["metric"] == source["metrics"]["accuracy"] and row["size_bytes"] == source["size_bytes"]
        assert row["latency"] == source["latency"] and row["latency"].keys() == {"batch_1", "batch_8"}
        assert row["latency"]["batch_1"]["runs"] == 6
        assert row["delta"] == pytest.approx(row["metric"] - reference["metric"])
        for key in ("batch_1", "batch_8"):
            assert row["speedup"][key] == pytest.approx(reference["latency"][key]["p50_ms"] / row["latency"][key][
                "p50_ms"])
    assert rows["torch-fp32"]["verdict"] == "baseline" and rows["int8-static"]["verdict"] == "passed: metric + numeric"
    assert report["latency"]["settings"]["threads"] == 1 and report["metric"] == {"name": "accuracy",
                                                                                  "higher_is_better": True}
    markdown = (out / "report.md").read_text()
    for name, row in rows.items():
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |")
                    or line.startswith(f"| **{name}** |"))
        assert f"{row['latency']['batch_1']['p50_ms']:.2f}" in line and f"{row['size_bytes'] / 1e6:.1f}" in line
    assert "1 intra-op thread(s)" in markdown and "median token length" in markdown
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_image_run_through_torch_export_and_static_int8(image_data_run: Path, tmp_path: Path):
    manifest = run_pipeline(CompressConfig(
        run_dir=str(image_data_run), out=str(tmp_path / "bundle"), default_variant="keep",
        gate=GateConfig(max_relative_drop=0.9),  # random weights: accuracy near chance, this checks the plumbing
        latency=LatencyConfig(runs=4, rounds=2, warmup=1, batch_sizes=[1, 4]),
        stages=[{"torch": {}}, {"export": {}}, {"quantize": {"name": "int8", "method": "static", "per_channel": True,
                                                          "calibration_samples": 16}}]))
    fp32, baselines = manifest.variants["fp32"], manifest.data["compress"]["baselines"]
    # PyTorch and ONNX Runtime score the 17 eval images (preprocessed as serving does) to the same accuracy.
    assert fp32["metrics"]["num_examples"] == baselines["torch-fp32"]["metrics"]["num_examples"] == 17
    assert fp32["metrics"]["accuracy"] == baselines["torch-fp32"]["metrics"]["accuracy"]
    assert fp32["parity"]["inputs"] == "eval split (16 of 17 images)"
    assert baselines["torch-int8-dynamic"]["latency"]["batch_4"]["runs"] == 4
    assert manifest.default_variant == "fp32"
    int8 = manifest.variants["int8"]["quantization"]
    assert int8["method"] == "static" and int8["calibration"]["source"] == "train split (16 of 48 images)"
    assert int8["quantized_ops"]["model"]["QuantizeLinear"] > 0
    assert manifest.variants["fp32"]["latency"]["batch_4"]["p95_ms"] > 0


# --- the plan ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_compress_configs_plan(path: Path):
    cfg = load_config(CompressConfig, path)
    kinds = [kind for kind, _ in plan_stages(cfg.stages)]
    assert kinds[:3] == ["torch", "export", "optimize"] and "quantize" in kinds


def test_shipped_compress_configs_exist():
    assert len(list(CONFIGS.glob("*.yaml"))) >= 3


@pytest.mark.parametrize(("stages", "message"), [
    ([{"quantise": {}}], "stages[0]: unknown stage 'quantise'; did you mean quantize?"),
    ([{"export": {}}, {"quantize": {"per_chanel": True}}], "unknown config key stages[1].quantize.per_chanel; did you "
                                                           "mean stages[1].quantize.per_channel?"),
    ([{"quantize": {}}], "stages[0]: a quantize stage needs an export stage of the same model before it"),
    ([{"export": {}}, {"quantize": {}}, {"quantize": {}}], "two quantize stages are named 'int8-dynamic'"),
    ([{"export": {}, "optimize": {}}], "stages[0] must name one stage"),
    ([{"export": {}}, {"quantize": {"method": "static", "source": "optimized"}}], "static quantization calibrates"),
    ([{"export": {"evaluate": False}}, {"quantize": {}}], "stages[1]: a quantize stage gates on the eval metric of "
                                                          "the fp32 graph, which stages[0].export does not record"),
])
def test_plan_refuses_a_bad_stage_list_before_any_work(stages: list, message: str):
    with pytest.raises(ConfigError) as err:
        plan_stages(stages)
    assert message in str(err.value)


# --- run-to-run stages ---------------------------------------------------------------------------------------------

@dataclass
class CopyConfig:
    note: str = "same weights"


def copy_run(run_dir: Path, out: Path, *, config: CopyConfig, overwrite: bool = False, trainer=None) -> Path:
    """A stand-in for prune_run / distill_run: writes a new run directory (here the same model)."""
    shutil.copytree(run_dir, out)
    return out


def test_a_run_to_run_stage_adds_the_new_models_variants(text_run: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(STAGES, "copy", StageKind(CopyConfig, transform_stage(copy_run, "copied"), new_model=True))
    with pytest.raises(ConfigError, match=r"stages\[2\]: a quantize stage needs an export stage of the same model"):
        plan_stages([{"export": {}}, {"copy": {}}, {"quantize": {}}])
    out = tmp_path / "bundle"
    manifest = run_pipeline(CompressConfig(
        run_dir=str(text_run), out=str(out), latency=LatencyConfig(runs=2, rounds=1, warmup=0, batch_sizes=[1]),
        stages=[{"export": {}}, {"copy": {"note": "n"}}, {"torch": {"int8_dynamic": False}}, {"export": {}},
                {"quantize": {}}]))
    assert list(manifest.variants) == ["fp32", "copied-fp32", "copied-int8-dynamic"]
    derived = manifest.variants["copied-fp32"]["derived"]
    assert derived["stage"] == "copied" and derived["settings"] == {"note": "n"}
    assert derived["run"] == "../bundle-runs/copied"  # relative to the bundle: no builder's absolute path
    int8 = manifest.variants["copied-int8-dynamic"]
    assert int8["parent"] == "copied-fp32" and int8["derived"] == derived
    assert manifest.variants["fp32"]["derived"] is None
    assert manifest.data["compress"]["baselines"]["copied-torch-fp32"]["derived"] == derived
    # The copy scores like the original: the same model on the same eval split.
    assert manifest.variants["copied-fp32"]["metrics"]["accuracy"] == manifest.variants["fp32"]["metrics"]["accuracy"]


def test_prune_and_distill_stages_put_three_models_in_one_report(text_run: Path, tmp_path: Path):
    """The real run-to-run stages: a pruned model and, back from the source, a distilled one, each exported and
    quantized next to the source's variants."""
    out = tmp_path / "bundle"
    quick = LatencyConfig(runs=2, rounds=1, warmup=0, batch_sizes=[1])
    manifest = run_pipeline(trainer=TRAINER, cfg=CompressConfig(
        run_dir=str(text_run), out=str(out), latency=quick, gate=GateConfig(max_relative_drop=0.5),
        stages=[{"export": {}}, {"quantize": {}},
                {"prune": {"heads": 0.5, "ffn": 0.5, "importance": "magnitude"}}, {"export": {}}, {"quantize": {}},
                {"source": {}},
                {"distill": {"student_layers": [1], "max_steps": 2, "overrides": ["train.batch_size=8"]}},
                {"export": {}}]))
    assert list(manifest.variants) == ["fp32", "int8-dynamic", "pruned-fp32", "pruned-int8-dynamic",
                                       "distilled-fp32"]
    pruned, distilled = manifest.variants["pruned-fp32"]["derived"], manifest.variants["distilled-fp32"]["derived"]
    assert pruned["stage"] == "pruned" and distilled["stage"] == "distilled"
    assert pruned["from"] == distilled["from"]  # both from the source run, by its path relative to the bundle
    assert (out / pruned["from"]).resolve() == text_run.resolve()
    sizes = {name: v["size_bytes"] for name, v in manifest.variants.items()}
    assert sizes["pruned-fp32"] < sizes["fp32"] and sizes["distilled-fp32"] < sizes["fp32"]
    report = json.loads((out / "report.json").read_text())
    assert {"pruned-fp32", "distilled-fp32"} <= {row["name"] for row in report["rows"]}
    # No absolute path of the machine that built them (issue 14.8): manifest, report, pruning and distillation
    # records name runs relative to the bundle or by name.
    shipped = [out / "manifest.json", out / "report.json", out / "report.md",
               *sorted((tmp_path / "bundle-runs").glob("*/model/tuneforge.json")),
               *sorted((tmp_path / "bundle-runs").glob("*/metrics.json"))]
    assert len(shipped) == 7
    for path in shipped:
        text = path.read_text()
        for absolute in (str(tmp_path.resolve()), str(text_run.resolve().parent)):
            assert absolute not in text, f"{path.relative_to(tmp_path)} holds {absolute}"
    with pytest.raises(ConfigError, match=r"stages\[0\]: a source stage goes back"):
        plan_stages([{"source": {}}])
    with pytest.raises(ConfigError, match=r"stages\[2\]: a second prune stage would overwrite"):
        plan_stages([{"prune": {"heads": 0.5}}, {"source": {}}, {"prune": {"ffn": 0.5}}])
    # Each model names its own int8 variant: the same name is fine across models.
    assert len(plan_stages([{"export": {}}, {"quantize": {}}, {"prune": {"heads": 0.5}}, {"export": {}},
                            {"quantize": {}}])) == 5


def test_a_quantize_stage_that_lands_on_an_existing_variant_is_not_written_twice(text_run: Path, tmp_path: Path):
    """E.g. static int8 that passes only on its last rung (dynamic instead of static), the same graph as the dynamic
    stage's: recorded as dropped, with the twin named, and no second copy in the bundle."""
    out = tmp_path / "bundle"
    manifest = run_pipeline(CompressConfig(
        run_dir=str(text_run), out=str(out), latency=LatencyConfig(runs=2, rounds=1, warmup=0, batch_sizes=[1]),
        gate=GateConfig(max_relative_drop=0.5),
        stages=[{"torch": {"int8_dynamic": False}}, {"export": {}}, {"quantize": {"name": "int8-a"}},
                {"quantize": {"name": "int8-b"}}]))
    assert list(manifest.variants) == ["fp32", "int8-a"]
    dropped = manifest.data["rejected"]["int8-b"]
    assert "same graph as variant int8-a: not written twice" in dropped["reason"]
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(
        Path(manifest.graph_path(name)).name for name in manifest.variants)
    report = json.loads((out / "report.json").read_text())
    assert any(row["name"] == "int8-b" and row["verdict"] == "dropped" and "not written twice" in row["reason"]
               for row in report["rows"])


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_run_names_a_bad_config_and_writes_nothing(text_run: Path, tmp_path: Path):
    out = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "compress", "run", "--config", str(CONFIGS / "text_default.yaml"),
                           f"run_dir={text_run}", f"out={out}", "stages=[{export: {}}, {quantise: {}}]"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: stages[1]: unknown stage 'quantise'; did you mean quantize?" in proc.stderr
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "compress", "run", "--help-config"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "latency.threads: int = 1" in proc.stdout
