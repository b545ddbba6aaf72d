"""Int8 quantization: the quantized nodes in the graphs, calibration methods, the metric gate and its ladder, PyTorch
dynamic int8."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compress.bundle import ExportConfig, export_run
from compress.latency import LatencyConfig, session_options
from compress.metric_gate import GateConfig, metric_verdict
from compress.parity import ParityConfig
from compress.pipeline import CompressConfig, run_pipeline
from compress.quantize import (
    SENSITIVE_OPS,
    QuantizeConfig,
    Settings,
    ladder,
    quantize_graph,
    quantize_torch_dynamic,
)
from compress.source import load_model, read_run
from compress.tasks.text import TextClassifierExport

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DYNAMIC = Settings("dynamic", per_channel=False, reduce_range=False, exclude_op_types=())
QUICK_LATENCY = LatencyConfig(runs=4, rounds=2, warmup=1, batch_sizes=[1, 2])


def ops(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def weight_matmuls(path: Path) -> int:
    """The nodes dynamic int8 turns into MatMulInteger: MatMuls whose second input is a weight (an initializer), and
    Gemms (the quantizer splits them into MatMul + Add first)."""
    model = onnx.load(str(path))
    weights = {init.name for init in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "Gemm" or (n.op_type == "MatMul" and n.input[1] in weights))


def per_channel(path: Path) -> bool:
    """Whether the graph's weight scales are per channel (1-D scale tensors with more than one value)."""
    model = onnx.load(str(path))
    return any(i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1 for i in model.graph.initializer)


@pytest.fixture(scope="module")
def text_exported(text_run: Path, tmp_path_factory: pytest.TempPathFactory):
    return export_run(read_run(text_run), tmp_path_factory.mktemp("q") / "bundle", config=ExportConfig(optimize=True))


# --- the graphs ----------------------------------------------------------------------------------------------------

def test_dynamic_int8_of_the_export_quantizes_every_weight_matmul(text_exported, tmp_path: Path):
    fp32 = text_exported.manifest.graph_path("fp32")
    counts = quantize_graph(fp32, tmp_path / "q.onnx", DYNAMIC)
    expected = weight_matmuls(fp32)
    assert expected == 14  # 2 layers x (q, k, v, attention out, ffn in, ffn out) + pooler and classifier (Gemm)
    # What stays fp32: the attention products of activations (q.k and attention.v), 2 per layer.
    assert counts["MatMulInteger"] == expected and ops(tmp_path / "q.onnx")["MatMul"] == 4
    # One DynamicQuantizeLinear per distinct activation: q, k and v share theirs.
    assert 0 < counts["DynamicQuantizeLinear"] < expected
    assert counts["DequantizeLinear"] == 3  # word, position and token-type embeddings (int8 Gather)

    excluded = quantize_graph(fp32, tmp_path / "no_gather.onnx", Settings("dynamic", False, False, ("Gather",)))
    assert excluded["MatMulInteger"] == expected and "DequantizeLinear" not in excluded


def test_dynamic_int8_of_the_optimized_graph_uses_fused_int8_kernels(text_exported, tmp_path: Path):
    optimized = text_exported.manifest.graph_path("optimized")
    before = ops(optimized)
    counts = quantize_graph(optimized, tmp_path / "q.onnx", DYNAMIC)
    assert counts["QAttention"] == before["Attention"] == 2
    assert counts["QEmbedLayerNormalization"] == before["EmbedLayerNormalization"] == 1
    # Attention out, ffn in / out per layer, the classifier (Gemm); the pooler's FusedGemm (with tanh) stays fp32.
    assert counts["MatMulInteger"] == weight_matmuls(optimized) == 7
    # A session with the bundle's settings: int8 GEMMs fused with their scales and biases, and no slow fusions formed.
    options, kwargs = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"], **kwargs)
    loaded = ops(tmp_path / "loaded.onnx")
    assert loaded["DynamicQuantizeMatMul"] + loaded["MatMulIntegerToFloat"] == 7
    assert loaded["SkipLayerNormalization"] == loaded["BiasGelu"] == 0 and loaded["LayerNormalization"] == 4


def test_static_int8_is_qdq_calibrated_with_the_requested_method(image_data_run: Path, tmp_path: Path):
    exported = export_run(read_run(image_data_run), tmp_path / "bundle")
    fp32, task = exported.manifest.graph_path("fp32"), exported.task
    calibration = task.calibration_inputs(20)
    assert len(calibration[0]) == 20 and calibration[1] == "train split (20 of 48 images)"
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        path = tmp_path / f"{method}.onnx"
        counts = quantize_graph(fp32, path, Settings("static", True, False, ()), calibration=calibration,
                                calibration_method=method, percentile=99.0)
        graph = onnx.load(str(path)).graph
        convs = [n for n in graph.node if n.op_type == "Conv"]
        producers = {o: n.op_type for n in graph.node for o in n.output}
        # QDQ: every Conv reads a dequantized activation and dequantized weights.
        assert len(convs) == ops(fp32)["Conv"] >= 3
        assert all(producers.get(c.input[0]) == producers.get(c.input[1]) == "DequantizeLinear" for c in convs)
        assert counts["QuantizeLinear"] >= len(convs) and counts["DequantizeLinear"] >= 2 * len(convs)
        values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        scales[method] = {n.input[0]: float(values[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"}
    # MinMax (uint8, asymmetric): the input's scale spans exactly the calibration images' range, with 0 inside it.
    pixels = np.concatenate([f["pixel_values"] for f in calibration[0]])
    want = (max(pixels.max(), 0) - min(pixels.min(), 0)) / 255
    assert scales["minmax"]["pixel_values"] == pytest.approx(want, rel=1e-5)
    # The 99th percentile clips the widest values of every activation; entropy picks its own thresholds.
    assert scales["minmax"].keys() == scales["percentile"].keys() == scales["entropy"].keys()
    assert all(scales["percentile"][t] < scales["minmax"][t] for t in scales["minmax"])
    assert any(scales["entropy"][t] != pytest.approx(scales["minmax"][t], rel=1e-3) for t in scales["minmax"])


def test_quantizing_a_causal_lm_quantizes_both_graphs_and_gates_on_perplexity(tmp_path: Path):
    from conftest import make_causal_lm_run

    run = make_causal_lm_run(tmp_path / "run", arch="llama")
    cfg = CompressConfig(run_dir=str(run), out=str(tmp_path / "bundle"), stages=[
        {"export": {}}, {"quantize": {"name": "int8", "per_channel": True}}], latency=QUICK_LATENCY)
    cfg.gate = GateConfig(metric="perplexity", max_relative_drop=0.05)
    manifest = run_pipeline(cfg)
    int8 = manifest.variants["int8"]
    ops_by_role = int8["quantization"]["quantized_ops"]
    assert ops_by_role.keys() == {"model", "decoder"}
    for role in ("model", "decoder"):
        assert ops_by_role[role]["MatMulInteger"] == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm head
    assert int8["parity"]["reference"] == "fp32" and int8["parity"]["graphs"].keys() == {"model", "decoder"}
    gate = int8["metric_gate"]
    assert gate["metric"] == "perplexity" and not gate["higher_is_better"] and gate["passed"]
    assert gate["reference_value"] == manifest.variants["fp32"]["metrics"]["perplexity"] > 1
    assert int8["size_bytes"] < 0.85 * manifest.variants["fp32"]["size_bytes"]  # tiny: graph structure weighs in


# --- the gate and its ladder ---------------------------------------------------------------------------------------

def test_metric_verdict_in_both_directions():
    up = metric_verdict({"accuracy": 0.85}, {"accuracy": 0.87}, metric="accuracy", higher_is_better=True,
                        max_relative_drop=0.01, reference="fp32")
    assert not up["passed"] and up["relative_drop"] == pytest.approx(0.02 / 0.87)
    down = metric_verdict({"perplexity": 10.2}, {"perplexity": 10.0}, metric="perplexity", higher_is_better=False,
                          max_relative_drop=0.03, reference="fp32")
    assert down["passed"] and down["relative_drop"] == pytest.approx(0.02)
    nan = metric_verdict({"mae": float("nan")}, {"mae": 0.5}, metric="mae", higher_is_better=False,
                         max_relative_drop=0.5, reference="fp32")
    assert not nan["passed"]


def test_int8_numeric_check_pools_top1_over_the_parity_positions(monkeypatch):
    """A lone flip in a one-row case is one position of four, not a 0% case: pooled agreement 75%."""
    from types import SimpleNamespace

    from compress import quantize
    from compress.errors import ParityError
    from compress.parity import Case

    fp32 = {"b1": np.array([[2.0, 0.5]]), "b3": np.array([[2.0, 0.0], [0.0, 2.0], [1.5, 0.1]])}
    # The flip: each |diff| 0.8 is within tolerance, but fp32's gap 1.5 exceeds it (1.0 + 0.2 * 2.0): no near-tie.
    int8 = {"b1": np.array([[1.2, 1.3]]), "b3": fp32["b3"] + 0.05}

    class Session:
        def get_inputs(self):
            return [SimpleNamespace(name="case")]

        def get_outputs(self):
            return [SimpleNamespace(name="logits")]

        def run(self, names, feeds):
            return [int8[str(feeds["case"])]]

    monkeypatch.setattr(quantize, "open_session", lambda path: Session())
    task = SimpleNamespace(samples_source="eval split", cases={"model": [
        Case("batch 1", {"case": np.array("b1")}), Case("batch 3", {"case": np.array("b3")})]})
    reference = {"model": lambda feeds: {"logits": fp32[str(feeds["case"])]}}
    gate = GateConfig()
    record = quantize.int8_parity({"model": Path("int8.onnx")}, reference, task, gate.int8_parity(ParityConfig()),
                                  "int8")
    assert record["top1_agreement"] == 0.75 and record["positions"] == 4 and record["reference"] == "fp32"
    strict = GateConfig(int8_min_top1_agreement=0.9).int8_parity(ParityConfig())
    with pytest.raises(ParityError, match=r"top-1 agrees with the fp32 graph on 75.0% of 4 parity positions"):
        quantize.int8_parity({"model": Path("int8.onnx")}, reference, task, strict, "int8")


def test_the_ladder_adds_one_safer_setting_at_a_time():
    rungs = ladder(QuantizeConfig(method="static"))
    assert [label for label, _ in rungs] == ["as configured", "per-channel weights", "sensitive ops in fp32",
                                            "7-bit weights (reduce_range)", "dynamic instead of static"]
    assert rungs[-2][1] == Settings("static", True, True, SENSITIVE_OPS)
    assert rungs[-1][1] == Settings("dynamic", True, False, ())  # exclusions added for static's sake are dropped
    assert [label for label, _ in ladder(QuantizeConfig(per_channel=True))] == [
        "as configured", "sensitive ops in fp32", "7-bit weights (reduce_range)"]
    assert len(ladder(QuantizeConfig(ladder=False))) == 1


def degrade_unless_per_channel(monkeypatch, *, always: bool = False) -> list[str]:
    """Make int8 graphs score 25% lower accuracy unless their weights are per channel (or always): the way MiniLM
    loses 1.5 points per tensor. Returns the graphs it scored."""
    real = TextClassifierExport.evaluate
    seen = []

    def evaluate(self, path: Path):
        metrics = real(self, path)
        quantized = any(op in ops(path) for op in ("MatMulInteger", "QAttention", "DequantizeLinear"))
        if quantized:
            seen.append(path.name)
            if always or not per_channel(path):
                metrics = {**metrics, "accuracy": metrics["accuracy"] * 0.75}
        return metrics

    monkeypatch.setattr(TextClassifierExport, "evaluate", evaluate)
    return seen


def test_metric_gate_rejects_a_degraded_variant_and_the_ladder_recovers(text_run: Path, tmp_path: Path, monkeypatch):
    seen = degrade_unless_per_channel(monkeypatch)
    manifest = run_pipeline(CompressConfig(run_dir=str(text_run), out=str(tmp_path / "bundle"), latency=QUICK_LATENCY,
                                           stages=[{"export": {}}, {"optimize": {}}, {"quantize": {}}]))
    variant = manifest.variants["int8-dynamic"]
    attempts = variant["quantization"]["ladder"]
    assert seen == ["int8-dynamic.try1.onnx", "int8-dynamic.try2.onnx"]
    assert [a["rung"] for a in attempts] == ["as configured", "per-channel weights"]
    assert not attempts[0]["passed"] and "25.00% worse, more than the 1.00% allowed" in attempts[0]["reason"]
    assert attempts[1]["passed"] and attempts[1]["per_channel"] and attempts[1]["reason"] is None
    assert variant["quantization"]["per_channel"] and not variant["quantization"]["requested"]["per_channel"]
    assert variant["metric_gate"]["passed"] and variant["metric_gate"]["relative_drop"] <= 0.01
    assert per_channel(manifest.graph_path("int8-dynamic")) and "rejected" not in manifest.data


def test_a_variant_failing_every_rung_is_dropped_with_its_reason(text_run: Path, tmp_path: Path, monkeypatch):
    degrade_unless_per_channel(monkeypatch, always=True)
    out = tmp_path / "bundle"
    manifest = run_pipeline(CompressConfig(run_dir=str(text_run), out=str(out), latency=QUICK_LATENCY, stages=[
        {"export": {}}, {"quantize": {"name": "int8-static", "method": "static", "calibration_samples": 8}}]))
    assert list(manifest.variants) == ["fp32"] and not list(out.glob("int8*"))
    dropped = manifest.data["rejected"]["int8-static"]
    rungs = [a["rung"] for a in dropped["attempts"]]
    # Static int8 quantizes MatMul / Gemm here, never LayerNorm, Softmax, GELU or Gather: keeping those in fp32
    # changes nothing, so that rung is skipped; the dynamic rung quantizes the embeddings (Gather) again.
    assert rungs == ["as configured", "per-channel weights", "7-bit weights (reduce_range)",
                     "dynamic instead of static"]
    assert dropped["skipped_rungs"] == [{"rung": "sensitive ops in fp32", "reason": "the same graph as attempt 2"}]
    assert [a["method"] for a in dropped["attempts"]] == ["static"] * 3 + ["dynamic"]
    assert dropped["attempts"][-1]["quantized_ops"]["model"]["DequantizeLinear"] == 3
    assert dropped["attempts"][-1]["per_channel"] and not dropped["attempts"][-1]["reduce_range"]
    assert all(not a["passed"] and "accuracy" in a["reason"] for a in dropped["attempts"])
    assert dropped["reason"].startswith("all 4 attempt(s) failed their gates; the last: accuracy")
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["rows"] if r["name"] == "int8-static")
    assert row["verdict"] == "dropped" and row["reason"] == dropped["reason"] and row["latency"] is None
    assert "## Dropped" in (out / "report.md").read_text()


# --- PyTorch dynamic int8 ------------------------------------------------------------------------------------------

def test_torch_dynamic_int8_replaces_every_linear(text_run: Path):
    import torch

    model = load_model(read_run(text_run))
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    quantized = quantize_torch_dynamic(model)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in quantized.modules()) == linears == 14
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == linears  # the original is untouched
    ids = torch.tensor([[2, 10, 11, 3]])
    with torch.inference_mode():
        want, got = model(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert torch.allclose(want, got, atol=0.05)
