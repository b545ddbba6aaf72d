"""The torch-free runtime for apps: load a bundle written by `python -m compress export` and predict.

    from serve import runtime
    model = runtime.load("bundles/reviews")                 # the default variant; or load(path, "int8-dynamic")
    for p in model.predict(["A wonderful film.", "Dull."]):
        print(p.label, p.probabilities)

Imports numpy, onnxruntime, tokenizers, Pillow and the bundle contract (serve.bundle); never torch,
transformers or datasets (a test checks), so `pip install tuneforge` (no extras) is all an app needs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from serve.batching import BatchingConfig
from serve.bundle.decoding import onnx_step
from serve.bundle.manifest import BundleError, Manifest, check_digest, read_manifest, verify_files
from serve.bundle.preprocessing import PreprocessingSpec
from serve.bundle.tasks import TEXT_TASKS, Task
from serve.errors import ServeError
from serve.generation import GenerationSettings, TextGenerator
from serve.predictors import ImageClassifier, Prediction, TextClassifier, check_threads

__all__ = ["BatchingConfig", "GenerationSettings", "ImageClassifier", "Prediction", "Predictor", "TextClassifier",
           "TextGenerator", "create_session", "load"]

logger = logging.getLogger(__name__)

Predictor = TextClassifier | ImageClassifier | TextGenerator


def load(bundle_dir: str | Path, variant: str | None = None, *, threads: int | None = None,
         batching: BatchingConfig | None = None, verify: bool = True, expect_digest: str | None = None) -> Predictor:
    """A predictor for the bundle's task, running one variant (default: the manifest's default_variant).

    threads: ONNX Runtime intra-op threads per model run (None: one per physical core; else an int >= 1).
    batching: micro-batch concurrent `predict` calls (classifiers; for servers with many callers).
    verify: check the sha256 of the files this variant uses (its graph, the tokenizer) against the manifest: this
    catches a corrupted copy, not a bundle someone changed on purpose (they can rewrite the manifest too).
    expect_digest: the bundle digest ("sha256:...", from `python -m compress verify BUNDLE`) this app was tested
    with; a bundle with another digest is refused (BundleError). It hashes every file of the bundle.
    Returns a TextClassifier (`predict(texts, pairs=None)`), ImageClassifier (`predict(images)`) or TextGenerator
    (`generate(prompt, ...)`, streamed). Every one of them is safe to share between threads.
    """
    threads = check_threads(threads)
    if expect_digest is not None:
        check_digest(bundle_dir, expect_digest)  # every file checked against the manifest, then the digest
        verify = False
    manifest = read_manifest(bundle_dir, verify=False)  # the format, what it says, and that every file is there
    name = variant or manifest.default_variant
    if verify:
        graph = "decoder" if manifest.task == Task.CAUSAL_LM else "model"
        used = [manifest.graph_path(name, graph).relative_to(manifest.path).as_posix(), manifest.tokenizer_file]
        verify_files(manifest, [f for f in used if f is not None])
    label = f"{manifest.path.name}/{name}"
    if manifest.task == Task.CAUSAL_LM:
        if batching is not None:
            raise ServeError("micro-batching applies to classifiers; a text generator streams one prompt per call")
        return load_generator(manifest, name, threads=threads)
    session = create_session(manifest.graph_path(name, "model"), threads=threads, settings=manifest.session(name))
    forward = _forward(session)
    if manifest.task in TEXT_TASKS:
        text = manifest.text
        return TextClassifier(load_tokenizer(manifest), forward, input_names=[i.name for i in session.get_inputs()],
                              labels=manifest.labels, task=manifest.task, max_length=text.max_length,
                              pair_column=text.text_pair_column, batching=batching, name=label)
    spec = PreprocessingSpec.from_dict(manifest.preprocessing)
    return ImageClassifier(spec, forward, labels=manifest.labels, input_name=session.get_inputs()[0].name,
                           batching=batching, name=label)


def load_generator(manifest: Manifest, variant: str, *, threads: int | None = None) -> TextGenerator:
    """A TextGenerator over the variant's KV-cache decoder graph."""
    decoder = create_session(manifest.graph_path(variant, "decoder"), threads=threads,
                             settings=manifest.session(variant))
    tokenizer = load_tokenizer(manifest)
    generation, section = manifest.generation, manifest.tokenizer
    ids = {"bos": section.bos_token_id, "eos": section.eos_token_id, "pad": section.pad_token_id}
    special = {f"{kind}_token": tokenizer.id_to_token(i) for kind, i in ids.items() if isinstance(i, int)}
    return TextGenerator(tokenizer, onnx_step(decoder, manifest.cache),
                         defaults=GenerationSettings.from_manifest(generation.defaults),
                         eos_token_id=generation.eos_token_id, pad_token_id=generation.pad_token_id,
                         max_length=manifest.text.max_length, max_positions=generation.max_positions,
                         chat_template=manifest.chat_template,
                         special_tokens=special, name=f"{manifest.path.name}/{variant}")


def load_tokenizer(manifest: Manifest) -> Any:
    """The bundle's tokenizer.json (training's truncation and padding are set in the file)."""
    from tokenizers import Tokenizer

    path = manifest.path / str(manifest.tokenizer_file)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for unreadable files
        raise BundleError(f"cannot read the tokenizer {path} ({str(err).splitlines()[0]}); re-export the "
                          "bundle") from None


def create_session(path: str | Path, *, threads: int | None = None, settings: dict[str, Any] | None = None) -> Any:
    """One ONNX Runtime CPU session for a graph; `run` on it is thread-safe, so predictors share it.

    settings: the variant's `session` entry of the manifest (graph optimization level, optimizers to leave out: the
    settings compress measured the variant with; e.g. fusions whose kernels are slower on this CPU).

    threads: intra-op threads of each run (None: ONNX Runtime's default, one per physical core); runs are sequential
    inside a graph (inter-op 1), which suits these chain-shaped transformer and CNN graphs. The pool's threads sleep
    rather than spin between runs: with concurrent callers, spinning threads burn the cores the other calls need.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ServeError("onnxruntime is not installed; pip install tuneforge (its base install has it)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = check_threads(threads) or 0  # 0: ONNX Runtime's default
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT warns about benign initializer clean-ups on exported graphs
    settings = settings or {}
    if settings.get("graph_optimization_level"):
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["graph_optimization_level"])
    disabled = list(settings.get("disabled_optimizers") or [])
    extra = {"disabled_optimizers": disabled} if disabled else {}
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"], **extra)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
        raise BundleError(f"ONNX Runtime cannot load {path} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          "re-export the bundle, or upgrade onnxruntime if the graph uses newer operators") from None


def _forward(session: Any) -> Any:
    """graph inputs -> the first output (logits), through the shared session."""
    output = session.get_outputs()[0].name
    wanted = {i.name for i in session.get_inputs()}

    def forward(feeds: dict[str, Any]) -> Any:
        return session.run([output], {k: v for k, v in feeds.items() if k in wanted})[0]

    return forward
