"""finetune.lm.data: packing text into blocks, the held-out tail, response-only masking, padding, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, LM_TEXT

from finetune.errors import DataError
from finetune.lm.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    CausalLMCollator,
    LMDataConfig,
    build_lm_splits,
    prepare_tokenizer,
    render_prompt,
)

PAIRS = [
    {"prompt": "Say hello.", "response": "Hello there!"},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"prompt": "Count to three.", "response": "One, two, three."},
    {"prompt": "What does a fox do?", "response": "It jumps over the lazy dog."},
]


def load_tokenizer(folder: Path, cfg: LMDataConfig):
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder), cfg)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- plain text ---------------------------------------------------------------------------------------------

def test_text_is_packed_into_full_blocks_and_the_tail_is_held_out(tiny_gpt2, tmp_path):
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, [{"text": LM_TEXT}, {"text": LM_TEXT.upper()}, {"text": "  "}])
    cfg = LMDataConfig(train=str(docs), block_size=16, eval_fraction=0.25)
    tokenizer = load_tokenizer(tiny_gpt2, cfg)
    splits = build_lm_splits(tokenizer, cfg, seed=0)

    eos = tokenizer.eos_token_id
    stream = [*tokenizer(LM_TEXT)["input_ids"], eos, *tokenizer(LM_TEXT.upper())["input_ids"], eos]
    blocks = [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]  # blank rows add nothing
    train, evals = list(splits["train"]["input_ids"]), list(splits["eval"]["input_ids"])
    assert train + evals == blocks, "blocks must be the token stream, in order, EOS after each document"
    assert len(evals) == round(0.25 * len(blocks)) and evals == blocks[-len(evals):]
    assert set(splits["train"]["length"]) == {16}
    assert "labels" not in splits["train"].column_names  # the collator copies input_ids


def test_text_file_is_one_document_with_its_line_breaks(tiny_gpt2, tmp_path):
    text = "first line\nsecond line\n\nthird, after a blank line\n" * 6
    path = tmp_path / "book.txt"
    path.write_text(text)
    cfg = LMDataConfig(train=str(path), block_size=8)
    splits = build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)
    tokenizer = load_tokenizer(tiny_gpt2, cfg)
    decoded = "".join(tokenizer.decode(ids) for ids in [*splits["train"]["input_ids"], *splits["eval"]["input_ids"]])
    assert decoded == (text + tokenizer.eos_token)[:len(decoded)]
    assert len(decoded) > 0.8 * len(text)


def test_max_samples_count_blocks(tiny_gpt2, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(LM_TEXT * 4)
    cfg = LMDataConfig(train=str(path), block_size=8, max_train_samples=5, max_eval_samples=2)
    splits = build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)
    assert (len(splits["train"]), len(splits["eval"])) == (5, 2)


def test_eval_file_is_used_instead_of_a_hold_out(tiny_gpt2, tmp_path):
    (tmp_path / "train.txt").write_text(LM_TEXT)
    (tmp_path / "eval.txt").write_text(LM_TEXT[:200])
    cfg = LMDataConfig(train=str(tmp_path / "train.txt"), eval=str(tmp_path / "eval.txt"), block_size=16)
    tokenizer = load_tokenizer(tiny_gpt2, cfg)
    splits = build_lm_splits(tokenizer, cfg, seed=0)
    assert len(splits["train"]) == (len(tokenizer(LM_TEXT)["input_ids"]) + 1) // 16
    assert len(splits["eval"]) == (len(tokenizer(LM_TEXT[:200])["input_ids"]) + 1) // 16


# --- instruction data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_only_response_tokens_carry_labels(fixture, request, tmp_path):
    """Hand-built: the labelled tokens decode to exactly the response and its end-of-turn, nothing of the prompt."""
    folder = request.getfixturevalue(fixture)
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = LMDataConfig(train=str(path), eval=str(path), format="instruction", block_size=96)
    tokenizer = load_tokenizer(folder, cfg)
    splits = build_lm_splits(tokenizer, cfg, seed=0)
    eos = tokenizer.eos_token
    for pair, ids, labels in zip(PAIRS, splits["train"]["input_ids"], splits["train"]["labels"], strict=True):
        head = render_prompt(tokenizer, pair["prompt"], cfg)
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        assert ids[:len(head_ids)] == head_ids
        assert labels[:len(head_ids)] == [IGNORE_INDEX] * len(head_ids), "prompt tokens must be masked"
        target = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        assert labels[len(head_ids):] == ids[len(head_ids):] == target
        assert tokenizer.decode(target) == f"{pair['response']}{eos}"  # both templates end the turn with EOS
        assert pair["prompt"] in tokenizer.decode(ids[:len(head_ids)])


def test_tokenizers_get_a_pad_token_and_keep_their_own_chat_template(tiny_gpt2, tiny_llama):
    from transformers import AutoTokenizer

    instruction = LMDataConfig(format="instruction")
    gpt2 = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert gpt2.pad_token is None and not gpt2.chat_template  # like GPT-2: no pad token, no template
    gpt2 = prepare_tokenizer(gpt2, instruction)
    assert gpt2.pad_token == gpt2.eos_token
    assert gpt2.chat_template == DEFAULT_CHAT_TEMPLATE
    assert render_prompt(gpt2, "Hi", instruction) == "### Instruction:\nHi\n\n### Response:\n"
    llama = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_llama), instruction)
    assert llama.chat_template == CHAT_TEMPLATE and llama.pad_token == llama.eos_token
    assert not prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_gpt2), LMDataConfig()).chat_template


def test_system_prompt_comes_first(tiny_llama):
    cfg = LMDataConfig(format="instruction", system_prompt="Be brief.")
    text = render_prompt(load_tokenizer(tiny_llama, cfg), "Hi", cfg)
    assert text == "<|system|>Be brief.<|endoftext|><|user|>Hi<|endoftext|><|assistant|>"


def test_instruction_rows_are_held_out_at_random(tiny_gpt2, tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)]
    cfg = LMDataConfig(train=str(write_jsonl(tmp_path / "qa.jsonl", rows)), format="instruction", eval_fraction=0.2)
    tokenizer = load_tokenizer(tiny_gpt2, cfg)
    splits = build_lm_splits(tokenizer, cfg, seed=0)
    numbers = {name: {int(tokenizer.decode(ids).split("answer ")[1].split(tokenizer.eos_token)[0])
                      for ids in split["input_ids"]} for name, split in splits.items()}
    assert len(numbers["train"]) == 16 and len(numbers["eval"]) == 4
    assert numbers["train"] | numbers["eval"] == set(range(20))
    assert numbers["eval"] != {16, 17, 18, 19}, "rows are held out at random, not the file's tail"


def test_examples_whose_prompt_fills_the_block_are_dropped(tiny_gpt2, tmp_path):
    rows = [{"prompt": "short", "response": "fine"}, {"prompt": "long " * 40, "response": "lost"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = LMDataConfig(train=str(path), eval=str(path), format="instruction", block_size=48)
    splits = build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)
    assert len(splits["train"]) == 1 and max(splits["train"]["length"]) <= 48


# --- collator -----------------------------------------------------------------------------------------------

def test_collator_pads_right_and_masks_padding():
    batch = CausalLMCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    packed = CausalLMCollator(pad_token_id=0)([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])
    assert torch.equal(packed["labels"], packed["input_ids"])


# --- bad input ----------------------------------------------------------------------------------------------

def test_empty_text_file(tiny_gpt2, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg = LMDataConfig(train=str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match=r"empty\.txt' is empty; it needs some text"):
        build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)


def test_blank_text_file(tiny_gpt2, tmp_path):
    (tmp_path / "blank.txt").write_text("\n \n\n")
    cfg = LMDataConfig(train=str(tmp_path / "blank.txt"))
    with pytest.raises(DataError, match="the train split holds no text in column 'text'"):
        build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)


def test_block_size_larger_than_the_data(tiny_gpt2, tmp_path):
    (tmp_path / "small.txt").write_text("just a few words")
    cfg = LMDataConfig(train=str(tmp_path / "small.txt"), block_size=64)
    with pytest.raises(DataError, match=r"holds \d+ tokens, fewer than one block of data\.block_size=64; lower"):
        build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)


def test_one_block_cannot_be_split(tiny_gpt2, tmp_path):
    (tmp_path / "small.txt").write_text(LM_TEXT)
    cfg = LMDataConfig(train=str(tmp_path / "small.txt"))
    tokenizer = load_tokenizer(tiny_gpt2, cfg)
    cfg.block_size = (len(tokenizer(LM_TEXT)["input_ids"]) + 1) // 2 + 1  # the stream makes exactly one block
    with pytest.raises(DataError, match=r"makes 1 block of data\.block_size=.*needs at least 2"):
        build_lm_splits(tokenizer, cfg, seed=0)


def test_instruction_file_without_the_response_column(tiny_gpt2, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "answer": "b"}] * 4)
    cfg = LMDataConfig(train=str(path), format="instruction")
    with pytest.raises(DataError) as info:
        build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)
    assert str(info.value) == ("column 'response' not found in the train split (columns: prompt, answer); "
                               "set data.response_column")


def test_embedded_json_extraction_set_loads(tiny_gpt2):
    cfg = LMDataConfig(format="instruction")
    splits = build_lm_splits(load_tokenizer(tiny_gpt2, cfg), cfg, seed=0)
    assert (len(splits["train"]), len(splits["eval"])) == (320, 48)


# --- evaluation ---------------------------------------------------------------------------------------------

def test_eval_loss_weighs_every_token_once(tiny_llama, tmp_path):
    """Batches of unequal size and padding: the mean is over tokens, equal to one example at a time."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from finetune.evaluation import score_causal_lm

    rows = [{"prompt": "q" * (1 + 5 * i), "response": "fox " * (1 + 3 * (i % 3))} for i in range(7)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = LMDataConfig(train=str(path), eval=str(path), format="instruction", block_size=96)
    tokenizer = load_tokenizer(tiny_llama, cfg)
    examples = build_lm_splits(tokenizer, cfg, seed=0)["eval"].remove_columns("length")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loader = DataLoader(examples, batch_size=3, collate_fn=CausalLMCollator(tokenizer.pad_token_id))
    accelerator = Accelerator(cpu=True)
    metrics = score_causal_lm(accelerator, *accelerator.prepare(model, loader))

    total, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = labels[0, 1:]
            keep = targets != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
        for batch in loader:
            batch_means.append(model(**batch).loss.item())
    assert metrics["num_tokens"] == count
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)
    assert abs(sum(batch_means) / len(batch_means) - total / count) > 1e-3, "batch means would differ here"
