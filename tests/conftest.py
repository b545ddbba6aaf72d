"""Shared fixtures: a tiny 2-layer BERT with a tokenizer built here, tiny datasets, generated images, and a recipe
runner.

Nothing is downloaded: HF_HUB_OFFLINE=1 makes an accidental hub access fail fast.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from compress.training import ScriptTrainer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (pyproject's addopts): each worker, and every process it starts, computes
    # on one thread, so the workers do not contend for the cores (tiny models gain nothing from a second thread).
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ["good", "great", "excellent", "lovely", "superb", "happy", "fine", "wonderful", "nice",
            "perfect"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "horrible", "sad", "broken", "ugly", "worst", "boring"]
NEUTRAL = ["the", "a", "it", "was", "is", "this", "product", "movie", "item", "really", "quite", "very",
           "and", "but", "so"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests that need real weights or shared data")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """datasets' cache in a temp dir, so tests never reuse (or pollute) the user's cache."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))


def make_tokenizer_dir(path: Path) -> Path:
    """A WordPiece BERT tokenizer over the test vocabulary, saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(POSITIVE + NEGATIVE + NEUTRAL))
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = {tok: i for i, tok in enumerate(specials + words + pieces
                                            + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'"))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(path)
    return path


def make_tiny_bert(path: Path, *, dropout: float = 0.0, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT encoder (random weights) plus tokenizer, saved like a pretrained checkpoint."""
    import torch
    from transformers import BertConfig, BertModel

    make_tokenizer_dir(path)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


LM_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model learns to say what comes next. "
    "Every line here ends with a full stop, and every story starts again at the top. "
) * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_lm_tokenizer_dir(path: Path, *, chat_template: bool = False) -> Path:
    """A byte-level BPE tokenizer (about 300 tokens, any text encodes) with an EOS token and, like GPT-2, no PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([LM_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   model_max_length=128)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def make_tiny_causal_lm(path: Path, *, arch: str = "gpt2", chat_template: bool = False, seed: int = 0) -> Path:
    """A 2-layer, 32-wide GPT-2 or Llama (random weights) plus tokenizer, saved like a pretrained checkpoint."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    make_lm_tokenizer_dir(path, chat_template=chat_template)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, **ids))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_sentiment_csv(path: Path, rows: int, *, seed: int, header: str = "text,sentiment,score") -> Path:
    """Rows of neutral filler plus 1-2 polar words; the label follows the polar words (a tiny BERT learns)."""
    rng = random.Random(seed)
    lines = [header]
    for _ in range(rows):
        positive = rng.random() < 0.5
        polar = rng.sample(POSITIVE if positive else NEGATIVE, rng.randint(1, 2))
        words = rng.sample(NEUTRAL, rng.randint(2, 8)) + polar
        rng.shuffle(words)
        score = round(rng.uniform(3.5, 5.0) if positive else rng.uniform(1.0, 2.5), 2)
        lines.append(f"{' '.join(words)},{'positive' if positive else 'negative'},{score}")
    path.write_text("\n".join(lines) + "\n")
    return path


GENERATION_DEFAULTS = {"max_new_tokens": 32, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
                       "repetition_penalty": 1.1, "do_sample": True}


def make_causal_lm_run(path: Path, *, arch: str, chat_template: bool = False) -> Path:
    """A run directory as the causal-LM recipe writes it: model/ (tiny LM + tokenizer + tuneforge.json), no data."""
    model = make_tiny_causal_lm(path / "model", arch=arch, chat_template=chat_template)
    task = {"task": "causal-lm", "block_size": 64, "generation": GENERATION_DEFAULTS, "chat_template": chat_template,
            "eval": {"eval_loss": 5.6, "perplexity": 270.4}}
    (model / "tuneforge.json").write_text(json.dumps(task))
    return path


def make_image_run(path: Path, *, seed: int = 0) -> Path:
    """A run directory as the image recipe writes it: a tiny transformers ResNet (3 classes, 24x20 RGB input, BatchNorm
    statistics made non-trivial) with its preprocessing spec in tuneforge.json."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    labels = ["cat", "dog", "fox"]
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = ResNetForImageClassification(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(path / "model", safe_serialization=True)
    task = {"task": "image-classification", "label_names": labels,
            "preprocessing": {"size": [24, 20], "color_mode": "RGB", "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3],
                              "resample": "bilinear", "rescale": 1 / 255},
            "eval": {"accuracy": 0.4}}
    (path / "model" / "tuneforge.json").write_text(json.dumps(task))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads contend (~30x slower per op).
    Opt in per module: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_dropout"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_gpt2"), arch="gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), arch="llama", chat_template=True)


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train.csv (96 rows) and eval.csv (17 rows: an odd count, so 2 processes must not double-count one)."""
    folder = tmp_path_factory.mktemp("sentiment")
    return {"train": make_sentiment_csv(folder / "train.csv", 96, seed=1),
            "eval": make_sentiment_csv(folder / "eval.csv", 17, seed=2)}


@pytest.fixture(scope="session")
def text_run(tiny_bert: Path, sentiment_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished text-classification run directory (the shipped recipe, 4 steps), with its eval split on disk."""
    out = tmp_path_factory.mktemp("text_run") / "run"
    run_recipe("text_classification", "--config", "recipes/configs/text_classification/default.yaml",
               f"model.name_or_path={tiny_bert}", f"data.train={sentiment_data['train']}",
               f"data.eval={sentiment_data['eval']}", "data.label_names=[negative, positive]",
               f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=4", "optim.lr=3.0e-3")
    return out


def make_pair_csv(path: Path, rows: int, *, seed: int) -> Path:
    """Sentiment rows with a second text column, `context` (neutral filler): data for a text-pair classifier."""
    rng = random.Random(seed)
    make_sentiment_csv(path, rows, seed=seed)
    lines = path.read_text().splitlines()
    out = ["text,context,sentiment"]
    for line in lines[1:]:
        text, sentiment, _ = line.split(",")
        out.append(f"{text},{' '.join(rng.sample(NEUTRAL, rng.randint(1, 6)))},{sentiment}")
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.fixture(scope="session")
def pair_text_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-pair classification run (text + context columns, 8 steps) with max_length 24: under the tiny BERT's 64
    positions, so over-long input is truncated as in training, never out of range."""
    folder = tmp_path_factory.mktemp("pair_run")
    train, evals = make_pair_csv(folder / "train.csv", 96, seed=3), make_pair_csv(folder / "eval.csv", 17, seed=4)
    out = folder / "run"
    run_recipe("text_classification", "--config", "recipes/configs/text_classification/default.yaml",
               f"model.name_or_path={tiny_bert}", f"data.train={train}", f"data.eval={evals}",
               "data.text_pair_column=context", "data.max_length=24", "data.label_names=[negative, positive]",
               f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=8", "optim.lr=3.0e-3")
    return out


def _export(run: Path, out: Path, *, optimize: bool = False) -> Path:
    import torch

    from compress.bundle import ExportConfig, export_bundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export_bundle(run, out, config=ExportConfig(optimize=optimize)).path
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def serve_text_bundle(text_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The text_run exported with two variants (fp32 and optimized; the optimized one is the default)."""
    return _export(text_run, tmp_path_factory.mktemp("serve") / "text", optimize=True)


@pytest.fixture(scope="session")
def serve_pair_bundle(pair_text_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(pair_text_run, tmp_path_factory.mktemp("serve") / "pair")


@pytest.fixture(scope="session")
def serve_image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_run(tmp_path_factory.mktemp("image") / "run")


@pytest.fixture(scope="session")
def serve_image_bundle(serve_image_run: Path) -> Path:
    return _export(serve_image_run, serve_image_run.parent / "bundle")


@pytest.fixture(scope="session")
def serve_lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (grouped-query attention) run with a chat template."""
    return make_causal_lm_run(tmp_path_factory.mktemp("lm") / "run", arch="llama", chat_template=True)


@pytest.fixture(scope="session")
def serve_lm_bundle(serve_lm_run: Path) -> Path:
    return _export(serve_lm_run, serve_lm_run.parent / "bundle")


SHAPES = ["bar", "column", "box"]


def make_shape_images(count: int, *, seed: int, size: int = 12, rgb: bool = False):
    """`count` uint8 images [count, size, size] (or [..., 3]) of a horizontal bar, a vertical bar or a hollow box at a
    random place on a noisy dark background, and their class ids (0, 1, 2 in turn): a tiny CNN learns them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(count, size, size), dtype=np.uint8)
    labels = np.arange(count) % len(SHAPES)
    for image, label in zip(images, labels, strict=True):
        r, c = rng.integers(1, size - 5, size=2)
        if label == 0:
            image[r + 2, c:c + 5] = 230
        elif label == 1:
            image[r:r + 5, c + 2] = 230
        else:
            image[r:r + 5, c:c + 5] = 230
            image[r + 1:r + 4, c + 1:c + 4] = rng.integers(0, 40)
    if rgb:
        images = np.stack([images, images // 2, 255 - images], axis=-1)
    return images, labels.astype(np.int64)


@pytest.fixture(scope="session")
def shape_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes.npz: 48 train and 17 eval (an odd count, so 2 processes must not double-count one) 12x12 images."""
    import numpy as np

    x_train, y_train = make_shape_images(48, seed=1)
    x_test, y_test = make_shape_images(17, seed=2)
    path = tmp_path_factory.mktemp("shapes") / "shapes.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="session")
def image_data_run(shape_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ResNet run of `make_image_run` with its data recorded in config.yaml (shape_npz), as the image recipe
    writes it: eval split, calibration images and PyTorch baselines come from it. The 12x12 grey shapes are resized to
    the model's 24x20 RGB by its preprocessing."""
    run = make_image_run(tmp_path_factory.mktemp("image_data") / "run")
    meta_path = run / "model" / "tuneforge.json"
    meta = json.loads(meta_path.read_text())
    meta["label_names"] = ["0", "1", "2"]
    meta_path.write_text(json.dumps(meta))
    (run / "config.yaml").write_text(f"data:\n  train: {shape_npz}\ntrain:\n  seed: 3\n")
    return run


@pytest.fixture(scope="session")
def resnet_run(shape_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished image-classification run: a tiny ResNet (inner widths 8 and 16) trained 6 steps by the shipped
    resnet_small.yaml on the generated shapes, with its data config (a teacher / pruning source for compress)."""
    out = tmp_path_factory.mktemp("resnet_run") / "run"
    run_recipe("image_classification", "--config", "recipes/configs/image_classification/resnet_small.yaml",
               "model.config.embedding_size=8", "model.config.hidden_sizes=[8, 16]", "model.config.depths=[1, 1]",
               "augment.enabled=false", f"data.train={shape_npz}", f"data.label_names=[{', '.join(SHAPES)}]",
               f"train.output_dir={out}", "train.batch_size=8", "train.eval_batch_size=8", "train.max_steps=6",
               "train.epochs=1", "optim.warmup_ratio=0.0")
    return out


# What tests pass to prune_run / distill_run / run_pipeline: the recipes of this checkout.
TRAINER = ScriptTrainer(REPO / "recipes")


def run_recipe(recipe: str, *args: str, launcher: list[str] | None = None, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `recipes/<recipe>.py` in a subprocess from the repo root (as a user would), capturing output."""
    cmd = [*(launcher or [sys.executable]), str(REPO / "recipes" / f"{recipe}.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc
