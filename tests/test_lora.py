"""finetune.lm.lora: only adapters train; merging reproduces the adapted model and leaves it unchanged."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import ConfigError
from finetune.lm.lora import LoraConfig, apply_lora, count_parameters, is_peft_model, merged_adapters


def adapted(folder, **overrides):
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(enabled=True, r=4, **overrides))
    with torch.no_grad():  # fresh adapters compute nothing (B = 0); make them matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    return model.eval()


@pytest.mark.parametrize(("fixture", "targets", "adapted_modules"), [
    ("tiny_gpt2", "all-linear", 8),  # 2 layers x c_attn, c_proj (attention), c_fc, c_proj (MLP)
    ("tiny_llama", ["q_proj", "v_proj"], 4),
])
def test_only_adapter_parameters_train(fixture, targets, adapted_modules, request):
    model = adapted(request.getfixturevalue(fixture), target_modules=targets)
    assert is_peft_model(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * adapted_modules
    counts = count_parameters(model)
    expected = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counts["trainable"] == expected < counts["total"] / 2


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_merged_model_reproduces_the_adapted_logits(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    model = adapted(folder)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-2, "the adapters must change the output for this test"

    with merged_adapters(model) as (base, state_dict):
        assert not any("lora_" in k or "base_layer" in k for k in state_dict)
        base.save_pretrained(tmp_path, state_dict=state_dict)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not is_peft_model(plain)
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
    assert (merged - expected).abs().max() < 1e-4
    after = model.state_dict()
    drift = max((after[k] - before[k]).abs().max().item() for k in before)
    assert drift < 1e-6, "merging for a save must leave the training model as it was"


def test_unknown_target_module_names_the_real_ones(tiny_llama):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match=r"matches no module of the model; its linear layers are named .*q_proj"):
        apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama),
                   LoraConfig(enabled=True, target_modules=["c_attn"]))
