"""Explanations from the bundle (serve.explain) on models with a known answer: hand-built ONNX classifiers whose
decision depends on one planted word or one image region, written as minimal bundles and loaded by serve.runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_imports import modules_after, top_level

from serve import runtime
from serve.bundle.manifest import new_manifest, sha256_file, write_manifest
from serve.bundle.preprocessing import ImageError
from serve.errors import InputError
from serve.explain import (
    IMAGE_METHODS,
    TEXT_METHODS,
    ImageExplanation,
    TextExplanation,
    deletion_insertion,
    explain,
    words_of,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "movie", "was", "really", "and", "it", "quite", "nice", "good", "bad", "plot", "long", "but",
         "acting", "fine", "is", "so", "very", "story"]
PIECES = [*"abcdefghijklmnopqrstuvwxyz", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
PLANTED = "zesty"  # out of vocabulary: word pieces z ##e ##s ##t ##y, and the model keys on the piece "z"
TEXT = "the movie was really long, and the plot was quite good but it is so zesty and the acting fine."
REGION = (slice(1, 4), slice(5, 8))  # rows 1-3, columns 4-7 of the 8x8 model input decide the class


def tokenizer_json(path: Path) -> Path:
    """A BERT-style WordPiece tokenizer with padding and truncation set, as a bundle's tokenizer.json is."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + WORDS + PIECES + list(".,!?'")))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens(SPECIALS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=64)
    tok.save(str(path))
    return path


def bag_bundle(base: Path, *, task: str = "text-classification", pair_column: str | None = None) -> Path:
    """Embedding-bag + linear over token ids: small random weights per token, +4 toward "positive" for the piece "z"
    (only the planted word has it) and a bias of -2: positive iff the planted word is there. Regression: the output is
    the positive logit minus the negative one (one value)."""
    from onnx import TensorProto, helper, numpy_helper

    folder = base / "bundle"
    folder.mkdir(parents=True)
    tokenizer = tokenizer_json(folder / "tokenizer.json")
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    weights = np.random.default_rng(0).normal(0, 0.1, (len(vocab), 2)).astype(np.float32)
    weights[[vocab[s] for s in SPECIALS]] = 0  # [MASK] (the replacement), [PAD], [CLS], [SEP] carry nothing
    weights[vocab["z"]] = [0.0, 4.0]
    bias = np.array([0.0, -2.0], np.float32)
    if task == "text-regression":
        weights, bias = weights[:, 1:] - weights[:, :1], bias[1:] - bias[:1]
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
             helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),
             helper.make_node("Mul", ["embedded", "mask3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
             helper.make_node("Add", ["pooled", "bias"], ["logits"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "bag", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                   ["batch", len(bias)])],
                              initializer=[numpy_helper.from_array(weights, "embedding"),
                                           numpy_helper.from_array(bias, "bias"),
                                           numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                                           numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    labels = None if task == "text-regression" else ["negative", "positive"]
    return _finish(folder, model, task, labels=labels,
                   text={"max_length": 64, "text_column": "text", "text_pair_column": pair_column})


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bag_bundle(tmp_path_factory.mktemp("explain_text"))


def _finish(folder: Path, graph, task: str, **sections) -> Path:
    """A minimal bundle in `folder`: one variant "fp32" with `graph`, the manifest's task sections, every sha256."""
    import onnx

    from compress.export import describe_graph

    onnx.save(graph, folder / "fp32.onnx")
    data = new_manifest(task, **sections)
    described = describe_graph(folder / "fp32.onnx")  # the graph's inputs and outputs, as export records them
    data["variants"] = {"fp32": {"graphs": {"model": {"file": "fp32.onnx", "inputs": described["inputs"],
                                                      "outputs": described["outputs"]}}}}
    data["default_variant"] = "fp32"
    data["files"] = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    write_manifest(folder, data)
    return folder


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear classifier over 8x8 grey pixels: every pixel outside REGION has the same weight for both classes (it
    cancels), the 9 REGION pixels add 1 each toward "region", bias -7: "region" iff the region is bright."""
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("explain") / "image"
    folder.mkdir(parents=True)
    shared = np.random.default_rng(1).normal(0, 0.5, (8, 8)).astype(np.float32)
    weights = np.stack([shared, shared], axis=-1)  # [8, 8, 2]
    weights[REGION[0], REGION[1], 1] += 1.0
    nodes = [helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "weight"], ["scores"]),
             helper.make_node("Add", ["scores", "bias"], ["logits"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                              ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
                              initializer=[numpy_helper.from_array(weights.reshape(64, 2), "weight"),
                                           numpy_helper.from_array(np.array([0.0, -7.0], np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    preprocessing = {"size": [8, 8], "color_mode": "L", "mean": [0.5], "std": [0.5], "resample": "bilinear"}
    return _finish(folder, model, "image-classification", labels=["plain", "region"], preprocessing=preprocessing)


def region_image(scale: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 [8 * scale, 8 * scale]: a noisy background, the REGION block white (each model pixel a scale^2 block)."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8)).astype(np.uint8)
    small[REGION] = 255
    return np.kron(small, np.ones((scale, scale), np.uint8))


# --- text -------------------------------------------------------------------------------------------------------------

def test_the_planted_word_decides_the_tiny_model(text_bundle: Path):
    model = runtime.load(text_bundle)
    assert len(model.tokenizer.encode(PLANTED, add_special_tokens=False).ids) == 5  # word pieces of one word
    assert model.predict([TEXT])[0].label == "positive"
    assert model.predict([TEXT.replace(PLANTED, "")])[0].label == "negative"


@pytest.mark.parametrize("replacement", ["mask", "remove"])
@pytest.mark.parametrize("method", TEXT_METHODS)
def test_every_text_method_puts_the_planted_word_on_top(text_bundle: Path, method: str, replacement: str):
    model = runtime.load(text_bundle)
    why = explain(model, TEXT, method=method, replacement=replacement, seed=0)
    assert isinstance(why, TextExplanation) and why.method == method and why.target == "positive"
    assert why.words == [TEXT[s:e] for s, e in words_of(TEXT)] and len(why.words) == 20  # words, not pieces
    assert why.top(1)[0][0] == PLANTED
    assert why.attributions.argmax() == why.words.index(PLANTED)
    assert why.replacement == ("[MASK]" if replacement == "mask" else "remove")
    assert why.score == pytest.approx(model.predict([TEXT])[0].probabilities["positive"], abs=1e-6)
    assert why.model_calls > 0 and why.batches >= 1 and why.seconds > 0
    if method == "occlusion":
        assert why.model_calls == len(why.words) + 1
    else:
        assert why.model_calls <= 64 + 2 and why.samples == 64
    # the highlighted chunks give back the text, the planted word at +1 (the largest magnitude)
    chunks = why.highlighted()
    assert "".join(piece for piece, _ in chunks) == TEXT
    assert dict((p, s) for p, s in chunks if s is not None)[PLANTED] == 1.0


def test_predictors_explain_beside_predict(text_bundle: Path, image_bundle: Path):
    text = runtime.load(text_bundle)
    assert text.explain(TEXT, method="shap", seed=1).top(1)[0][0] == PLANTED
    assert inside_top(runtime.load(image_bundle).explain(region_image(), method="rise").attributions)


def test_kernel_shap_is_exact_shapley_on_short_texts(text_bundle: Path):
    """With 2^n - 2 <= samples every coalition is scored: the values then add up to p(text) - p(all masked)."""
    model = runtime.load(text_bundle)
    text = "nice zesty plot, bad acting"
    why = explain(model, text, method="shap", samples=64)
    assert why.model_calls == 2 ** 5  # 30 coalitions + the full and the empty text
    masked = model.predict(["[MASK] [MASK] [MASK], [MASK] [MASK]"])[0].probabilities["positive"]
    assert why.attributions.sum() == pytest.approx(why.score - masked, abs=1e-6)
    assert why.top(1)[0][0] == PLANTED


def test_shap_enumerates_the_heaviest_coalition_sizes_first():
    from serve.explain import _coalitions

    rows, weights = _coalitions(20, 64, np.random.default_rng(0))
    sizes = rows.sum(axis=1)
    assert sorted(sizes[:40]) == [1] * 20 + [19] * 20  # every singleton and every leave-one-out, enumerated
    assert len(rows) <= 64 and sizes.min() >= 1 and sizes.max() <= 19 and weights.sum() == pytest.approx(1.0)
    rows, _ = _coalitions(5, 64, np.random.default_rng(0))  # 2^5 - 2 = 30 <= 64: every coalition once
    assert len(rows) == 30 and len({r.tobytes() for r in rows}) == 30
    assert len(_coalitions(30, 1, np.random.default_rng(0))[0]) == 2  # below one pair: one coalition, its complement


def test_explanations_are_deterministic_with_a_seed_and_follow_the_target(text_bundle: Path):
    model = runtime.load(text_bundle)
    first, again = (explain(model, TEXT, method="shap", samples=16, seed=3) for _ in range(2))
    np.testing.assert_array_equal(first.attributions, again.attributions)
    other = explain(model, TEXT, method="shap", samples=16, seed=4)
    assert not np.array_equal(first.attributions, other.attributions)
    negative = explain(model, TEXT, method="occlusion", target="negative")
    assert negative.target == "negative" and negative.target_index == 0
    assert negative.attributions.argmin() == negative.words.index(PLANTED)  # the planted word argues against it
    assert explain(model, TEXT, target=0).target == "negative"


def test_text_faithfulness_beats_random_order(text_bundle: Path):
    model = runtime.load(text_bundle)
    for method in TEXT_METHODS:
        why = explain(model, TEXT, method=method)
        result = deletion_insertion(model, TEXT, why, seeds=3)
        assert result.deletion_auc < result.random_deletion_auc, (method, str(result))
        assert result.insertion_auc > result.random_insertion_auc, (method, str(result))
        assert result.beats_random and len(result.fractions) == len(why.words) + 1
        assert result.deletion[0] == pytest.approx(why.score, abs=1e-6)
        assert result.model_calls == 1 + 2 * 4 * (len(why.words) + 1)  # the text itself (the target), then curves
    # raw scores work too: the planted word first, the rest in text order
    scores = np.zeros(20)
    scores[words_of(TEXT).index(next(s for s in words_of(TEXT) if TEXT[s[0]:s[1]] == PLANTED))] = 1
    assert deletion_insertion(model, TEXT, scores, steps=5).fractions.tolist() == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_regression_and_pair_models(tmp_path: Path):
    regression = runtime.load(bag_bundle(tmp_path / "regression", task="text-regression"))
    why = explain(regression, TEXT, method="shap")
    assert why.target is None and why.top(1)[0][0] == PLANTED
    assert why.score == pytest.approx(regression.predict([TEXT])[0].value, abs=1e-5)  # the output value itself
    assert deletion_insertion(regression, TEXT, why).deletion_auc < why.score
    with pytest.raises(InputError, match="a regression model has one output"):
        explain(regression, TEXT, target=1)

    pairs = runtime.load(bag_bundle(tmp_path / "pairs", pair_column="context"))
    why = explain(pairs, TEXT, pair="a nice story", method="occlusion")
    assert why.words == [TEXT[s:e] for s, e in words_of(TEXT)] and why.top(1)[0][0] == PLANTED  # the first text's
    assert deletion_insertion(pairs, TEXT, why).beats_random  # the pair is kept whole in the curves too
    with pytest.raises(InputError, match="trained on text pairs"):
        explain(pairs, TEXT)


def test_words_past_the_models_limit_are_not_explained(text_bundle: Path):
    model = runtime.load(text_bundle)
    long = f"{PLANTED} " + "the movie was good " * 40  # 161 words: the tokenizer keeps 62 tokens of them
    why = explain(model, long, method="occlusion")
    assert why.truncated and 50 < len(why.words) < 70 and why.top(1)[0][0] == PLANTED


# --- images -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_every_image_method_puts_the_planted_region_on_top(image_bundle: Path, method: str):
    model = runtime.load(image_bundle)
    image = region_image()
    assert model.predict([image])[0].label == "region"
    why = explain(model, image, method=method, seed=0)
    assert isinstance(why, ImageExplanation) and why.target == "region" and why.method == method
    assert why.attributions.shape == (8, 8) and why.heatmap.shape == (8, 8)
    inside = np.zeros((8, 8), bool)
    inside[REGION] = True
    top = np.unravel_index(why.attributions.argmax(), (8, 8))
    assert inside[top], f"{method}: top pixel {top} outside the region\n{np.round(why.attributions, 3)}"
    assert why.attributions[inside].mean() > 3 * max(why.attributions[~inside].mean(), 0)
    if method == "occlusion":  # patch 1: exactly the 9 region pixels matter, nothing else
        assert set(np.argsort(-why.attributions.ravel())[:9]) == set(np.flatnonzero(inside))
        assert why.model_calls == 65 and why.settings == {"patch": 1, "stride": 1}
    else:
        assert why.model_calls == 512 + 1 and why.samples == 512
    result = deletion_insertion(model, image, why)
    assert result.deletion_auc < result.random_deletion_auc and result.insertion_auc > result.random_insertion_auc


def test_the_heatmap_has_the_inputs_resolution(image_bundle: Path):
    model = runtime.load(image_bundle)
    image = np.kron(region_image(), np.ones((3, 5), np.uint8))  # 24 x 40: each model pixel a 3x5 block
    why = explain(model, Image.fromarray(image), method="occlusion", patch=2, stride=1)
    assert why.heatmap.shape == (24, 40) and why.attributions.shape == (8, 8)
    row, col = np.unravel_index(why.heatmap.argmax(), why.heatmap.shape)
    assert 3 <= row < 12 and 25 <= col < 40  # inside the region's 3x5 blocks
    overlay = why.overlay(Image.fromarray(image))
    assert overlay.size == (40, 24) and overlay.mode == "RGB"
    assert deletion_insertion(model, image, why.heatmap).beats_random  # a map at the input's size is resized back


def test_rise_is_deterministic_with_a_seed(image_bundle: Path):
    model = runtime.load(image_bundle)
    first, again = (explain(model, region_image(), method="rise", samples=32, seed=5) for _ in range(2))
    np.testing.assert_array_equal(first.attributions, again.attributions)
    black = explain(model, region_image(), method="occlusion", baseline="black")
    assert black.baseline == "black" and inside_top(black.attributions)


def inside_top(attributions: np.ndarray) -> bool:
    top = np.unravel_index(attributions.argmax(), attributions.shape)
    return REGION[0].start <= top[0] < REGION[0].stop and REGION[1].start <= top[1] < REGION[1].stop


# --- bad input --------------------------------------------------------------------------------------------------------

def test_bad_input_gets_one_clear_line(text_bundle: Path, image_bundle: Path):
    text, image = runtime.load(text_bundle), runtime.load(image_bundle)
    cases = [
        (lambda: explain(text, ""), InputError, "the text is empty"),
        (lambda: explain(text, "   \n"), InputError, "the text is empty"),
        (lambda: explain(text, "... !!"), InputError, "has no words to explain"),
        (lambda: explain(text, ["a", "b"]), InputError, "explain takes one text"),
        (lambda: explain(text, TEXT, method="lime"), InputError, "unknown method 'lime' for text classifiers; choose "
                                                                 "one of occlusion, shap"),
        (lambda: explain(text, TEXT, method="shap", samples=0), InputError, "samples must be a whole number of at "
                                                                            "least 1, got 0"),
        (lambda: explain(text, TEXT, target="neutral"), InputError, "unknown target label 'neutral'"),
        (lambda: explain(text, TEXT, target=2), InputError, "class index 0..1"),
        (lambda: explain(text, TEXT, replacement="blank"), InputError, "replacement must be one of mask, remove"),
        (lambda: explain(image, np.zeros((0, 0), np.uint8)), ImageError, "the image is 0x0 pixels"),
        (lambda: explain(image, region_image(), method="rise", samples=0), InputError, "at least 1"),
        (lambda: explain(image, region_image(), method="shap"), InputError, "choose one of occlusion, rise"),
        (lambda: explain(image, region_image(), patch=9), InputError, "patch must be 1..8"),
        (lambda: explain(image, region_image(), baseline="blur"), InputError, "baseline must be one of mean, black"),
        (lambda: explain(image, [region_image()]), InputError, "explain takes one image"),
        (lambda: deletion_insertion(text, TEXT, [1.0, 2.0]), InputError, "got 2 attributions for a text of 20 words"),
        (lambda: deletion_insertion(text, TEXT, np.zeros(20), seeds=0), InputError, "seeds must be at least 1"),
        (lambda: deletion_insertion(image, region_image(), np.zeros(64)), InputError, "a [height, width] map"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_explain_imports_no_torch():
    baseline = top_level(modules_after(""))
    loaded = top_level(modules_after("import serve.explain"))
    assert "serve" in loaded and "numpy" in loaded
    for heavy in ("torch", "transformers", "datasets", "captum", "gradio", "onnx"):
        assert heavy not in loaded - baseline, f"serve.explain imported {heavy}"
