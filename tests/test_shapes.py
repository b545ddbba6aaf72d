"""finetune.shapes: models with layer shapes their config cannot describe save and load like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.models import ModelConfig
from finetune.shapes import SHAPES_KEY, from_pretrained, record_shapes_, shape_record
from finetune.text.models import build_sequence_classifier


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def narrow_ffn_(model, layer: int, width: int) -> None:
    """Layer `layer`'s FFN with `width` neurons (by hand, as a pruner would)."""
    block = model.bert.encoder.layer[layer]
    block.intermediate.dense = nn.Linear(16, width)
    block.output.dense = nn.Linear(width, 16)


def test_an_unchanged_model_needs_no_record():
    assert shape_record(tiny_bert()) is None


def test_reshaped_layers_are_recorded_and_rebuilt(tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert()
    narrow_ffn_(model, 1, 5)
    record = record_shapes_(model)
    assert record["parameters"] == {"bert.encoder.layer.1.intermediate.dense.weight": [5, 16],
                                    "bert.encoder.layer.1.intermediate.dense.bias": [5],
                                    "bert.encoder.layer.1.output.dense.weight": [16, 5]}
    assert record["attributes"] == {"bert.encoder.layer.1.intermediate.dense": {"out_features": 5},
                                    "bert.encoder.layer.1.output.dense": {"in_features": 5}}
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())[SHAPES_KEY] == record

    ids = torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]])
    expected = model(input_ids=ids).logits
    loaded = from_pretrained(AutoModelForSequenceClassification, tmp_path / "m", dtype=torch.float32)
    assert loaded.bert.encoder.layer[1].intermediate.dense.out_features == 5
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)
    # the recipes' loader goes through the same path
    built = build_sequence_classifier(ModelConfig(name_or_path=str(tmp_path / "m")), label_names=["a", "b"],
                                      problem_type="single_label_classification")
    torch.testing.assert_close(built.eval()(input_ids=ids).logits, expected, atol=0, rtol=0)

    # A new label set: the mismatched head is freshly initialised (as from_pretrained does), the rest loads.
    relabelled = from_pretrained(AutoModelForSequenceClassification, tmp_path / "m", num_labels=3,
                                 ignore_mismatched_sizes=True)
    assert relabelled.classifier.out_features == 3
    layer = relabelled.bert.encoder.layer[1]
    assert torch.equal(layer.output.dense.weight, model.bert.encoder.layer[1].output.dense.weight)


def test_a_record_that_does_not_match_the_weights_is_refused(tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert()
    narrow_ffn_(model, 0, 6)
    record_shapes_(model)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config[SHAPES_KEY]["parameters"]["bert.encoder.layer.0.output.dense.weight"] = [16, 7]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"output\.dense\.weight has shape \[16, 6\], the rebuilt model expects "
                                         r"\[16, 7\]"):
        from_pretrained(AutoModelForSequenceClassification, tmp_path / "m")


def test_tied_weights_load_once(tiny_gpt2: Path, tmp_path: Path):
    """GPT-2 saves its tied lm_head once; the rebuilt model gets it from the embeddings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    mlp = model.transformer.h[0].mlp
    mlp.c_fc.weight = nn.Parameter(mlp.c_fc.weight[:, :100].clone())
    mlp.c_fc.bias = nn.Parameter(mlp.c_fc.bias[:100].clone())
    mlp.c_fc.nf = 100
    mlp.c_proj.weight = nn.Parameter(mlp.c_proj.weight[:100].clone())
    mlp.c_proj.nx = 100
    record_shapes_(model)
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "m")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_models_without_a_record_load_with_plain_from_pretrained(tmp_path: Path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    tiny_bert().save_pretrained(tmp_path / "m")
    calls = []
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_config",
                        classmethod(lambda cls, *a, **k: calls.append(a)))
    from_pretrained(AutoModelForSequenceClassification, tmp_path / "m")
    assert not calls
