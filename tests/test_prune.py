"""Pruning: structured removal of heads / FFN neurons / channels is exact (removing silenced units changes no
output), shrinks the parameter count by the computed amount, reloads from disk and exports with parity; unstructured
pruning hits its sparsity exactly; prune_run writes a complete run directory, with recovery by the task's recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TRAINER

from compress.bundle import ExportConfig, export_bundle
from compress.errors import StageError
from compress.prune import PruneConfig, prune_run
from compress.source import load_model, read_run
from compress.sparsity import measure_sparsity, prune_magnitude_
from compress.structured import gradient_scores, magnitude_scores, mask_units_, prune_units_
from compress.units import attention_shape, find_units, update_config_
from finetune.shapes import SHAPES_KEY, from_pretrained, record_shapes_

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bert_classifier(path: Path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager").eval()


def causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def save_and_reload(model: torch.nn.Module, loader, path: Path) -> torch.nn.Module:
    update_config_(model)
    record_shapes_(model)
    model.save_pretrained(path)
    kwargs = {"attn_implementation": "eager"} if hasattr(model.config, "num_hidden_layers") else {}
    return from_pretrained(loader, path, **kwargs)


# --- structured: exactness ----------------------------------------------------------------------------------------

def test_bert_removing_silenced_heads_and_neurons_changes_nothing(tiny_bert: Path, tmp_path: Path):
    """Heads / neurons whose outputs are masked score exactly 0 by gradient importance, are the ones removed, and the
    pruned model's logits equal the masked model's. Parameter count falls by the computed amount."""
    from transformers import AutoModelForSequenceClassification

    model = bert_classifier(tiny_bert)
    groups = find_units(model)
    assert [(g.kind, g.units) for g in groups] == [("heads", 2), ("ffn", 64)] * 2
    silenced = {0: [1], 1: [3, 10, 40, 63], 2: [0], 3: [0, 1, 2, 5]}
    mask_units_(groups, silenced)
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row: attention masks still line up after pruning
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    reference = model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    scores = gradient_scores(model, groups, [batch, batch])
    for index, units in silenced.items():
        assert torch.all(scores[index][units] == 0)
        others = [u for u in range(groups[index].units) if u not in units]
        assert torch.all(scores[index][others] > 0)
    before = n_params(model)
    report = prune_units_(groups, scores, {"heads": 0.5, "ffn": 4 / 64})
    assert [r["kept"] for r in report.groups if r["kind"] == "heads"] == [[0], [1]]
    assert report.count("heads") == (4, 2) and report.count("ffn") == (128, 120)

    hidden, head = 32, 16  # tiny BERT: 2 heads of 16
    per_head = 3 * (hidden * head + head) + head * hidden  # q, k, v rows + biases; the output projection's columns
    per_neuron = (hidden + 1) + hidden  # intermediate row + bias; output column
    assert before - n_params(model) == 2 * per_head + 8 * per_neuron
    attn = model.bert.encoder.layer[0].attention.self
    assert attn.query.weight.shape == (16, 32) and attn.num_attention_heads == 1 and attn.all_head_size == 16
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == 60
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)

    # BERT's config derives head size from hidden / heads: the shapes go in config.json, and only the shape-aware
    # loader rebuilds them; the plain one refuses the checkpoint rather than load it wrong.
    reloaded = save_and_reload(model, AutoModelForSequenceClassification, tmp_path / "pruned")
    assert model.config.intermediate_size == 60  # uniform FFN widths are described by the config itself
    assert set(json.loads((tmp_path / "pruned" / "config.json").read_text())[SHAPES_KEY]) == {
        "parameters", "buffers", "attributes"}
    torch.testing.assert_close(reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits, logits,
                               atol=0, rtol=0)
    with pytest.raises((RuntimeError, ValueError), match="ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_heads_and_ffn_pruning_is_exact_and_reloads(arch: str, tiny_gpt2: Path, tiny_llama: Path,
                                                            tmp_path: Path):
    from transformers import AutoModelForCausalLM

    model = causal_lm(tiny_gpt2 if arch == "gpt2" else tiny_llama)
    groups = find_units(model)
    heads = [i for i, g in enumerate(groups) if g.kind == "heads"]
    ffn = [i for i, g in enumerate(groups) if g.kind == "ffn"]
    # Llama: 4 query heads share 2 KV heads; silence a whole KV group in layer 0, one query per group in layer 1.
    silenced = {heads[0]: [2, 3], heads[1]: [0, 3]} if arch == "llama" else {heads[0]: [1], heads[1]: [0]}
    silenced.update({ffn[0]: [1, 2], ffn[1]: [0, 7]})
    mask_units_(groups, silenced)
    ids = torch.randint(0, 250, (2, 9))
    reference = model(input_ids=ids).logits
    scores = gradient_scores(model, groups, [{"input_ids": ids, "labels": ids}])
    before = n_params(model)
    fractions = {"heads": 0.5, "ffn": 2 / groups[ffn[0]].units}
    # scope "global": each layer its own split of KV heads x queries ("layer" would impose one split on both)
    report = prune_units_(groups, scores, fractions, scope="global")
    assert [r["kept"] for r in report.groups if r["kind"] == "heads"] == (
        [[0, 1], [1, 2]] if arch == "llama" else [[0], [1]])
    torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)

    hidden = 32
    if arch == "llama":  # head_dim 8; layer 0 lost a KV head with its 2 queries, layer 1 one query per KV head
        layer0, layer1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        assert layer0.k_proj.out_features == 8 and layer0.num_key_value_groups == 2
        assert layer1.k_proj.out_features == 16 and layer1.num_key_value_groups == 1
        removed = 2 * 2 * 8 * hidden * 2 + 8 * hidden * 2 + 2 * 2 * 3 * hidden  # q + o; k + v; FFN gate/up/down
    else:  # 2 heads of 16 -> 1; c_attn has biases
        removed = 2 * (3 * (hidden * 16 + 16) + 16 * hidden) + 2 * 2 * (hidden + 1 + hidden)
    assert before - n_params(model) == removed

    # Generation with the KV cache runs on the new shapes.
    out = model.generate(ids[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    reloaded = save_and_reload(model, AutoModelForCausalLM, tmp_path / "pruned")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert attention_shape(model) == ((2, 16) if arch == "llama" else (1, 16))


def test_llama_uniform_pruning_is_described_by_its_config(tiny_llama: Path, tmp_path: Path):
    """Same share in every layer: Llama's config (explicit head_dim) describes the result, so no shape record is
    needed and the plain from_pretrained loads it."""
    from transformers import AutoModelForCausalLM

    model = causal_lm(tiny_llama)
    groups = find_units(model)
    prune_units_(groups, magnitude_scores(groups), {"heads": 0.5, "ffn": 0.25})
    update_config_(model)
    assert record_shapes_(model) is None
    config = model.config
    assert config.num_attention_heads == 2 and config.num_key_value_heads in (1, 2) and config.intermediate_size == 48
    model.save_pretrained(tmp_path / "pruned")
    ids = torch.randint(0, 250, (2, 6))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
    assert attention_shape(model) == (2, 16)


def test_global_scope_ranks_units_across_layers(tiny_bert: Path):
    model = bert_classifier(tiny_bert)
    groups = find_units(model)
    scores = [torch.tensor([1.0, 1.0]), torch.arange(64.0) + 1, torch.tensor([1.0, 1.0]), torch.ones(64)]
    scores[3][:40] = 0.001  # layer 1's FFN: 40 near-useless neurons (relative to the layer's norm)
    report = prune_units_(groups, scores, {"ffn": 0.25}, scope="global")
    assert {r["where"]: r["after"] for r in report.groups} == {"bert.encoder.layer.1.intermediate": 32}
    assert groups[1].units == 64 and groups[3].units == 32


# --- CNNs ---------------------------------------------------------------------------------------------------------

def simple_cnn():
    from finetune.vision.architectures import SimpleCNNConfig, SimpleCNNForImageClassification

    torch.manual_seed(0)
    config = SimpleCNNConfig(num_channels=1, image_size=[12, 12], conv_channels=[[8, 8], [16]], hidden_sizes=[24],
                             num_labels=3)
    model = SimpleCNNForImageClassification(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_simple_cnn_channel_pruning_is_exact_and_described_by_its_config(tmp_path: Path):
    from transformers import AutoModelForImageClassification

    model = simple_cnn()
    groups = find_units(model)
    assert [(g.kind, g.units) for g in groups] == [("channels", 8), ("channels", 8), ("channels", 16), ("ffn", 24)]
    silenced = {0: [0, 5], 1: [1, 2], 2: [3, 4, 9, 15], 3: [0, 1, 2, 3, 4, 5]}
    mask_units_(groups, silenced)
    pixels = torch.randn(4, 1, 12, 12)
    reference = model(pixel_values=pixels).logits
    scores = gradient_scores(model, groups, [{"pixel_values": pixels, "labels": torch.tensor([0, 1, 2, 0])}])
    before = n_params(model)
    prune_units_(groups, scores, {"channels": 0.25, "ffn": 0.25})
    torch.testing.assert_close(model(pixel_values=pixels).logits, reference, atol=1e-5, rtol=1e-5)
    # In order: conv1 loses 2 filters (1x3x3, no bias), their BatchNorm weight + bias and conv2's inputs (8 x 2 x 9);
    # conv2 2 filters (now 6 inputs x 9) + BN + conv3's inputs (16 x 2 x 9); conv3 4 filters of 6 x 9 + BN + the
    # linear layer's inputs (24 rows x 4 channels x 3x3 positions); the hidden layer 6 rows of (12 x 9 inputs + bias)
    # and the output layer's 6 columns (x 3 labels).
    removed = (2 * 9 + 4 + 8 * 2 * 9) + (2 * 6 * 9 + 4 + 16 * 2 * 9) + (4 * 6 * 9 + 8 + 24 * 4 * 9) + (
        6 * (12 * 9 + 1) + 6 * 3)
    assert before - n_params(model) == removed

    update_config_(model)
    assert model.config.conv_channels == [[6, 6], [12]] and model.config.hidden_sizes == [18]
    assert record_shapes_(model) is None
    model.save_pretrained(tmp_path / "cnn")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "cnn").eval()
    torch.testing.assert_close(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits, atol=0,
                               rtol=0)


def test_resnet_inner_channels_pruning_reloads(tmp_path: Path):
    """Channels inside each residual block go (block outputs feed the residual sums); ResNetConfig cannot describe
    per-block widths, so the shape record rebuilds them."""
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic",
                          num_labels=3)
    model = ResNetForImageClassification(config).eval()
    groups = find_units(model)
    assert [g.units for g in groups] == [8, 16, 16] and all(g.kind == "channels" for g in groups)
    pixels = torch.randn(2, 3, 24, 20)
    scores = gradient_scores(model, groups, [{"pixel_values": pixels, "labels": torch.tensor([0, 2])}])
    prune_units_(groups, scores, {"channels": 0.5})
    block = model.resnet.encoder.stages[1].layers[0].layer
    assert block[0].convolution.out_channels == 8 and block[1].convolution.in_channels == 8
    assert block[1].convolution.out_channels == 16  # the block output stays
    logits = model(pixel_values=pixels).logits
    reloaded = save_and_reload(model, AutoModelForImageClassification, tmp_path / "resnet")
    assert getattr(reloaded.config, SHAPES_KEY)["parameters"]
    torch.testing.assert_close(reloaded(pixel_values=pixels).logits, logits, atol=0, rtol=0)


# --- unstructured -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_magnitude_pruning_hits_the_target_exactly(tiny_gpt2: Path, sparsity: float):
    model = causal_lm(tiny_gpt2)
    wte = model.transformer.wte.weight.detach().clone()
    before = measure_sparsity(model)
    assert before["sparsity"] == 0.0
    result = prune_magnitude_(model, sparsity)
    assert result["zeros"] == round(sparsity * result["weights"]) and result["sparsity"] == pytest.approx(sparsity,
                                                                                                          abs=1e-4)
    # Conv1D weights of 2 blocks (attention 32x96 + 32x32, MLP 32x128 + 128x32); the tied lm_head / embeddings stay.
    assert result["weights"] == 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    assert torch.equal(model.transformer.wte.weight, wte)
    reference = causal_lm(tiny_gpt2)  # one global threshold: every pruned weight was smaller than every kept one
    pruned, kept = [], []
    for (name, w), w0 in zip(model.named_parameters(), reference.parameters(), strict=True):
        if name.endswith(".weight") and w.dim() == 2 and ".h." in name:
            pruned.append(w0[w == 0].abs())
            kept.append(w0[w != 0].abs())
    assert torch.cat(pruned).max() <= torch.cat(kept).min()


# --- prune_run: runs, recovery, export ----------------------------------------------------------------------------

def test_prune_run_with_iterative_recovery_by_the_recipe_then_export(text_run: Path, tmp_path: Path):
    """Two rounds (prune, recover with recipes/text_classification.py, re-score); the result is a normal run that
    reloads and exports to ONNX with parity, with and without ONNX Runtime's fusions."""
    out = prune_run(text_run, tmp_path / "pruned", trainer=TRAINER, config=PruneConfig(
        heads=0.5, ffn=0.5, rounds=2, recovery_steps=3, importance_batches=2, batch_size=8,
        recovery_overrides=["train.batch_size=8", "train.log_every_n_steps=1"]))
    for name in ("config.yaml", "metrics.json", "model/model.safetensors", "model/tokenizer.json",
                 "model/tuneforge.json", "logs/metrics.jsonl"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "train_loss" in e] == [1, 2, 3]  # the last round's recovery, by the recipe
    meta = json.loads((out / "model" / "tuneforge.json").read_text())
    record = meta["pruning"]
    assert record["units"] == {"heads": {"before": 4, "after": 2}, "ffn": {"before": 128, "after": 64}}
    assert [len(k) for k in record["kept"].values()] == [1, 32, 1, 32]
    assert record["parameters_before"] - record["parameters_after"] == 2 * (2096 + 32 * 65)
    assert meta["task"] == "text-classification" and meta["label_names"] == ["negative", "positive"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["num_examples"] == 17 and metrics["pruning"] == record

    model = load_model(read_run(out))
    assert model.bert.encoder.layer[1].attention.self.query.out_features == 16
    manifest = export_bundle(out, tmp_path / "bundle", config=ExportConfig(optimize=True))
    for variant in manifest.variants.values():
        assert variant["parity"]["passed"] and variant["parity"]["max_abs_diff"] < 1e-4
        assert variant["metrics"]["accuracy"] == pytest.approx(metrics["eval"]["accuracy"])
    fused = manifest.variants["optimized"]["optimization"]["graphs"]["model"]["fused_ops"]
    assert fused.get("Attention") == 2  # told the pruned head count, ONNX Runtime fuses both layers


def test_unstructured_prune_run_is_pruned_again_after_recovery(text_run: Path, tmp_path: Path):
    """Recovery training regrows pruned weights (the recipes keep no masks); the result is pruned to the target again
    and evaluated here."""
    out = prune_run(text_run, tmp_path / "sparse", trainer=TRAINER, config=PruneConfig(
        method="unstructured", sparsity=0.5, recovery_steps=2, recovery_overrides=["train.batch_size=8"]))
    meta = json.loads((out / "model" / "tuneforge.json").read_text())
    assert meta["pruning"]["sparsity_measured"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())["eval"]
    assert metrics["num_examples"] == 17 and 0.0 <= metrics["accuracy"] <= 1.0 and meta["eval"] == metrics
    assert measure_sparsity(load_model(read_run(out)))["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_layers_with_different_head_counts_export_without_attention_fusion(text_run: Path, tmp_path: Path):
    out = prune_run(text_run, tmp_path / "pruned", config=PruneConfig(heads=0.25, scope="global",
                                                                      importance="magnitude"))
    heads = [len(v) for k, v in json.loads((out / "model" / "tuneforge.json").read_text())["pruning"]["kept"].items()
             if k.endswith(".attention")]
    assert sorted(heads) == [1, 2]
    manifest = export_bundle(out, tmp_path / "bundle", config=ExportConfig(optimize=True))
    optimized = manifest.variants["optimized"]
    assert optimized["parity"]["passed"]
    assert "Attention" not in optimized["optimization"]["graphs"]["model"]["fused_ops"]


def test_prune_run_refuses_what_it_cannot_do(text_run: Path, tmp_path: Path):
    with pytest.raises(StageError, match="no channels that tuneforge can prune"):
        prune_run(text_run, tmp_path / "a", config=PruneConfig(channels=0.5, importance="magnitude"))
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match="rounds > 1"):
        PruneConfig(heads=0.5, rounds=2)
    with pytest.raises(ValueError, match="structured pruning needs"):
        PruneConfig()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(StageError, match="already exists"):
        prune_run(text_run, tmp_path / "full", config=PruneConfig(heads=0.5))


def test_image_prune_run_recovers_with_the_image_recipe(resnet_run: Path, tmp_path: Path):
    out = prune_run(resnet_run, tmp_path / "pruned", trainer=TRAINER, config=PruneConfig(
        channels=0.5, recovery_steps=2, importance_batches=2, batch_size=8,
        recovery_overrides=["train.batch_size=8", "train.eval_batch_size=8"]))
    meta = json.loads((out / "model" / "tuneforge.json").read_text())
    assert meta["pruning"]["units"] == {"channels": {"before": 24, "after": 12}}
    assert meta["preprocessing"] == json.loads((resnet_run / "model" / "tuneforge.json").read_text())["preprocessing"]
    model = load_model(read_run(out))
    assert model.resnet.encoder.stages[1].layers[0].layer[0].convolution.out_channels == 8
    assert json.loads((out / "metrics.json").read_text())["eval"]["num_examples"] == 17
    manifest = export_bundle(out, tmp_path / "bundle")
    assert manifest.variants["fp32"]["parity"]["passed"]


def test_causal_lm_prune_run_exports_a_decoder_with_cache(tmp_path: Path):
    """A Llama causal-LM run (GQA) pruned uniformly: its config describes it, and the KV-cache decoder export passes
    parity and greedy generation agrees with PyTorch."""
    from conftest import make_causal_lm_run

    run = make_causal_lm_run(tmp_path / "run", arch="llama")
    out = prune_run(run, tmp_path / "pruned", config=PruneConfig(heads=0.5, ffn=0.25, importance_batches=1,
                                                                 batch_size=4))
    meta = json.loads((out / "model" / "tuneforge.json").read_text())
    assert meta["pruning"]["units"] == {"heads": {"before": 8, "after": 4}, "ffn": {"before": 128, "after": 96}}
    assert meta["eval"]["perplexity"] > 1 and meta["generation"]["max_new_tokens"] == 32
    assert SHAPES_KEY not in json.loads((out / "model" / "config.json").read_text())
    manifest = export_bundle(out, tmp_path / "bundle")
    parity = manifest.variants["fp32"]["parity"]
    assert parity["passed"] and all(c["equal"] for c in parity["graphs"]["generation"]["cases"])
    with pytest.raises(StageError, match="use scope: layer"):
        prune_run(run, tmp_path / "global", config=PruneConfig(heads=0.5, scope="global"))
