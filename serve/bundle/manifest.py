"""The bundle format: a folder an app can use alone, described by `manifest.json`. Standard library only.

This module is what an app (and `serve.runtime`) reads; it imports nothing beyond the standard library and the
stdlib-only modules of serve.bundle, so it works where PyTorch, onnx and numpy are not installed.

A bundle folder holds:

    manifest.json            this file's format (below); the only entry point
    tokenizer.json           text tasks: a `tokenizers` file with truncation and padding already set, so
                             `tokenizers.Tokenizer.from_file(...).encode_batch(texts)` reproduces training tokenization
    <variant>.onnx           one ONNX graph per variant that passed its gates (fp32, optimized, later int8-...)
    <variant>.decoder.onnx   causal LMs: the decoder that takes and returns the KV cache, per variant
    report.md, report.json   written by `python -m compress run` (compress.report): every variant's metric, size and
    tradeoff.png             latency next to the PyTorch baselines, and the variants that were dropped, with why

manifest.json (format "tuneforge-bundle", format_version 1; readers accept the same major version and ignore keys
they do not know, so fields are added without a version bump):

    format, format_version, created (UTC ISO 8601)
    task             "text-classification" | "text-regression" | "causal-lm" | "image-classification"
    source_run       {"path", "eval": the run's own eval metrics (PyTorch), "base_model"}
    labels           label names, index = class id (null for regression and causal LMs)
    text             text tasks: {"max_length", "text_column", "text_pair_column"}
    tokenizer        text tasks: {"file": "tokenizer.json", "padding_side", "truncation_side", "max_length",
                     "add_special_tokens", "pad_token", "pad_token_id", "bos_token_id", "eos_token_id",
                     "special_tokens", "model_input_names"}; encode with the file alone, these are for reference
    preprocessing    image tasks: {"size": [H, W], "color_mode": "L"|"RGB", "mean", "std", "resample", "rescale"}:
                     convert, resize, multiply by rescale, subtract mean, divide by std, channels first (NCHW)
    generation       causal LMs: defaults {max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample,
                     eos_token_id, pad_token_id}, and max_positions (the model's positions: prompt + new tokens
                     must fit; null when the config does not say)
    chat_template    causal LMs: the Jinja chat template string, or null
    cache            causal LMs: {"num_layers", "num_kv_heads", "head_dim", "dtype",
                     "past_key": "past_key_values.{i}.key", "past_value", "present_key": "present.{i}.key",
                     "present_value"}: input/output name patterns of the decoder graph (below)
    default_variant  the variant an app should load when it has no preference
    variants         {name: variant entry}
    rejected         {name: {"stage", "reason", "attempts": [...]}}: variants a gate dropped (no file written), with
                     every attempt of the quantization ladder (absent when none was dropped)
    compress         how `python -m compress run` made the bundle (absent for `export`): {"config" (the resolved
                     compress config), "metric": {"name", "higher_is_better"}, "latency": {"settings", "inputs",
                     "timer"}, "baselines": {name: the PyTorch rows measured alongside: "runtime", "description",
                     "metrics", "size_bytes", "latency", "derived"}}
    report           {"markdown": "report.md", "json": "report.json", "plot": "tradeoff.png"} (absent without one)
    files            {relative path: sha256 hex} for every file of the bundle except manifest.json

A variant entry:

    graphs           {"model": graph, "decoder": graph (causal LMs only)}; graph = {"file", "inputs", "outputs"},
                     each tensor {"name", "dtype", "shape"} with symbolic dims as strings ("batch", "sequence")
    created          UTC ISO 8601
    parent           the variant it was derived from (null for fp32)
    opset, exporter, exporter_version
    optimization     null, or {"method", "fusions" (onnxruntime.transformers model type or null), "ort_level",
                     "skipped_fusions" (fused ops left out as slower on CPU, see compress.optimize),
                     "graphs": {role: {"nodes_before", "nodes_after", "fused_ops": {op: count}}}}
    quantization     null, or {"method": "dynamic"|"static", "format": "QOperator"|"QDQ", "source": the variant
                     quantized, "weight_type", "activation_type", "per_channel", "reduce_range", "exclude_op_types",
                     "calibration": null | {"method": "minmax"|"entropy"|"percentile", "samples", "source", ...},
                     "quantized_ops": {role: {op: count}}, "requested": the settings asked for, "library",
                     "ladder": [every attempt: rung, settings, metric, relative drop, verdict, reason],
                     "skipped_rungs": [rungs that would have made the same graph as an earlier attempt]}
    pruning          null, or the pruning settings
    derived          null, or how this variant's model was made from the source run by a run-to-run stage (prune,
                     distill): {"stage", "run", "settings"}
    sparsity         measured fraction of exactly-zero weights in the graph's weight matrices
    parity           the gate's verdict against PyTorch (int8 variants: against the fp32 graph, "reference" says
                     which): {"passed", "inputs" (where the samples came from), "atol",
                     "rtol", "min_top1_agreement", "max_abs_diff", "max_rel_diff", "top1_agreement" (null for
                     regression), "graphs": {role: {..., "cases": [per case and output]}, "generation": greedy
                     tokens vs PyTorch generate (causal LMs)}}
    metrics          the task metrics of this graph on the eval split, or null when not computed
    metric_gate      null, or the task-metric gate's verdict: {"metric", "higher_is_better", "reference" (variant),
                     "reference_value", "value", "relative_drop", "max_relative_drop", "passed"}
    session          the ONNX Runtime session settings the variant is meant to run with (and was measured with):
                     {"graph_optimization_level", "disabled_optimizers"}; see compress.optimize for why
    latency          null, or {"batch_<n>": {"p50_ms", "p95_ms", "mean_ms", "min_ms", "cpu_p50_ms", "runs"}} as
                     measured by compress.latency under the settings in the bundle-level `compress`
    size_bytes       total bytes of the variant's files
    environment      {"libraries": {name: version}, "cpu": {"model", "flags": {"avx2", "avx512f", "avx512_vnni", ...}},
                     "python", "platform"} of the machine that made it

Graphs (names are those of the graph; the manifest lists them with their shapes):

    text classification   input_ids, attention_mask [, token_type_ids]: int64 [batch, sequence]
                          -> logits [batch, labels] (text-regression: [batch, 1])
    image classification  pixel_values float32 [batch, C, H, W] -> logits [batch, labels]
    causal LM "model"     input_ids, attention_mask, position_ids: int64 [batch, sequence]
                          -> logits [batch, sequence, vocab]
    causal LM "decoder"   input_ids, position_ids [batch, sequence], attention_mask [batch, past_sequence + sequence],
                          past_key_values.{i}.key/.value float32 [batch, kv_heads, past_sequence, head_dim]
                          -> logits [batch, sequence, vocab], present.{i}.key/.value [batch, kv_heads,
                          past_sequence + sequence, head_dim]. Prefill runs the same graph with an empty past
                          (past_sequence = 0); each later step feeds back the presents. position_ids =
                          cumsum(attention_mask) - 1 (left padding: pad positions set to 1), as transformers does.

Writers never leave a half-written bundle: a new bundle is built in a temp folder and renamed; a variant is added by
moving its files in under new names and then replacing manifest.json (the commit point) in one rename.

Reading checks the content too (`validate_manifest`): labels against the logits, the session settings, the task's
sections (preprocessing, tokenizer, cache, generation), so a bad manifest fails at load with one BundleError rather than
later with an IndexError. The sha256 of each file catches corruption, not a hostile supplier (who can edit a file and
its hash together); to pin the exact bundle an app was tested with, compare `bundle_digest` (below) with the value
recorded then: `python -m compress verify BUNDLE --expect DIGEST`, `serve.runtime.load(..., expect_digest=DIGEST)`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import os
import platform
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from serve.bundle.errors import BundleError
from serve.bundle.folders import replace_file
from serve.bundle.sections import GenerationSection, TextSection, TokenizerSection
from serve.bundle.tasks import TASKS, Task

FORMAT = "tuneforge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
# ISA extensions that decide which int8 / fp32 kernels ONNX Runtime can use (names as in /proc/cpuinfo).
# ONNX Runtime's GraphOptimizationLevel names and the SessionOptions a variant's `session` entry may set.
ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_LAYOUT", "ORT_ENABLE_ALL")
SESSION_KEYS = ("graph_optimization_level", "disabled_optimizers")
PREPROCESSING_KEYS = ("size", "color_mode", "mean", "std", "resample", "rescale")
RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic", "lanczos")
CACHE_DTYPES = ("float32", "float16", "float64")
DIGEST_PREFIX = "sha256:"
DIGEST_VERSION = b"tuneforge-bundle-digest 1\n"
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp")


@dataclass
class Manifest:
    """A parsed, validated manifest.json; `data` keeps every field (including ones this version does not know)."""

    path: Path  # the bundle folder
    data: dict[str, Any] = field(repr=False)

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        return self.data["variants"]

    @property
    def default_variant(self) -> str:
        return self.data["default_variant"]

    @property
    def labels(self) -> list[str] | None:
        """Class names, index = class id (None for regression and causal LMs)."""
        return self.data.get("labels")

    @property
    def text(self) -> TextSection:
        return TextSection.from_dict(self.data.get("text"))

    @property
    def tokenizer(self) -> TokenizerSection:
        return TokenizerSection.from_dict(self.data.get("tokenizer"))

    @property
    def generation(self) -> GenerationSection:
        """Causal LMs' decoding defaults and token ids (validate_manifest refused a bundle without them)."""
        return GenerationSection.from_dict(self.data["generation"])

    @property
    def cache(self) -> dict[str, Any]:
        """Causal LMs: the decoder graph's KV cache layout (serve.bundle.decoding reads its name patterns)."""
        return self.data["cache"]

    @property
    def chat_template(self) -> str | None:
        return self.data.get("chat_template")

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Image tasks: the PreprocessingSpec as a dict (serve.bundle.preprocessing.PreprocessingSpec.from_dict)."""
        return self.data["preprocessing"]

    @property
    def source_run_path(self) -> str | None:
        """The source run's folder, relative to the bundle (absolute in bundles written before 2026-12)."""
        return (self.data.get("source_run") or {}).get("path")

    def session(self, variant: str) -> dict[str, Any]:
        """The ONNX Runtime session settings `variant` was measured with (serve.runtime.create_session)."""
        return self.variants[variant].get("session") or {}

    @property
    def tokenizer_file(self) -> str | None:
        """The tokenizer's path inside the bundle (text tasks and causal LMs); None for image classifiers."""
        if self.task == Task.IMAGE_CLASSIFICATION:
            return None
        section = self.data.get("tokenizer")
        return str((section if isinstance(section, dict) else {}).get("file", TOKENIZER_FILE))

    def graph_path(self, variant: str | None = None, graph: str = "model") -> Path:
        """The file of one graph ("model" or, for causal LMs, "decoder") of a variant (default: default_variant)."""
        name = variant or self.default_variant
        if name not in self.variants:
            raise BundleError(f"bundle {self.path} has no variant {name!r} (variants: {', '.join(self.variants)})")
        graphs = self.variants[name]["graphs"]
        if graph not in graphs:
            raise BundleError(f"variant {name!r} of {self.path} has no {graph!r} graph (graphs: {', '.join(graphs)})")
        return self.path / graphs[graph]["file"]


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (bundles hold graphs of hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: str | Path, *, verify: bool = True) -> Manifest:
    """Load a bundle's manifest, check its format and version, and (verify=True) that every file exists with its
    recorded sha256. Raises BundleError naming the problem."""
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist; export one with `python -m compress export RUN_DIR "
                          f"--out {root}`")
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST}; point at a folder written by "
                          "`python -m compress export`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON ({err}); re-export the bundle") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path} is not a {FORMAT} manifest (format: {found!r}); re-export the bundle")
    version = data.get("format_version")
    if not isinstance(version, int) or version != FORMAT_VERSION:
        raise BundleError(f"bundle {root} has format_version {version!r}, this tuneforge reads version "
                          f"{FORMAT_VERSION}; re-export the bundle with this version or install the tuneforge that "
                          "wrote it")
    for key in ("task", "variants", "files", "default_variant"):
        if key not in data:
            raise BundleError(f"{path} lacks the required key {key!r}; re-export the bundle")
    if data["task"] not in TASKS:
        raise BundleError(f"bundle {root} is for task {data['task']!r}, which this tuneforge does not know "
                          f"(tasks: {', '.join(TASKS)})")
    if data["default_variant"] not in data["variants"]:
        raise BundleError(f"{path}: default_variant {data['default_variant']!r} is not among the variants "
                          f"({', '.join(data['variants'])}); re-export the bundle")
    files = _checked_files(root, data)
    for name, variant in data["variants"].items():
        graphs = variant.get("graphs") if isinstance(variant, dict) else None
        if not isinstance(graphs, dict) or not graphs or not all(isinstance(g, dict) for g in graphs.values()):
            raise BundleError(f"{path}: variant {name!r} has no 'graphs' mapping; re-export the bundle")
        for graph in graphs.values():
            if graph.get("file") not in files:
                raise BundleError(f"{path}: variant {name!r} names {graph.get('file')!r}, which is not in 'files'; "
                                  "re-export the bundle")
    manifest = Manifest(root, data)
    if manifest.tokenizer_file is not None and manifest.tokenizer_file not in files:
        raise BundleError(f"{path}: the tokenizer {manifest.tokenizer_file!r} is not in 'files'; re-export the bundle")
    validate_manifest(manifest)
    for rel in files:
        if not (root / rel).is_file():
            raise BundleError(f"bundle {root} is incomplete: {rel} is missing (listed in {MANIFEST}); copy the whole "
                              "folder or re-export it")
    if verify:
        verify_files(manifest, files)
    return manifest


def _checked_files(root: Path, data: dict[str, Any]) -> dict[str, str]:
    """The manifest's `files` ({relative path: sha256}), every path inside the bundle folder."""
    files, path = data["files"], root / MANIFEST
    if not isinstance(data["variants"], dict) or not isinstance(files, dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BundleError(f"{path}: 'variants' and 'files' must be mappings (files: path -> sha256); re-export the "
                          "bundle")
    inside = root.resolve()
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not (root / rel).resolve().is_relative_to(inside):
            raise BundleError(f"{path} lists {rel!r}, a path outside the bundle folder; a bundle only names its own "
                              "files: re-export it")
    return files


def verify_files(manifest: Manifest, names: Iterable[str]) -> dict[str, str]:
    """Check that these files (paths relative to the bundle) match their sha256 in the manifest; an app that loads one
    variant checks just its files rather than every graph of the bundle. Returns {path: sha256} of the files."""
    files: dict[str, str] = manifest.data["files"]
    hashes = {}
    for rel in names:
        if rel not in files:
            raise BundleError(f"bundle {manifest.path}: {rel} is not listed in {MANIFEST}; re-export the bundle")
        hashes[rel] = sha256_file(manifest.path / rel)
        if hashes[rel] != files[rel]:
            raise BundleError(f"bundle {manifest.path}: {rel} does not match its sha256 in {MANIFEST} (changed or "
                              "corrupted after export); re-export the bundle")
    return hashes


def bundle_digest(bundle_dir: str | Path) -> str:
    """The bundle's digest, "sha256:<64 hex>": one value that changes when manifest.json or any file it lists changes.

    It is the sha256 of these bytes: the line `tuneforge-bundle-digest 1`, then `manifest.json <sha256 of its bytes>`,
    then `<path> <sha256>` for every file listed in the manifest's `files`, sorted by path (POSIX, relative to the
    bundle), each line ending in a newline. Files outside that list (a README someone added) do not count. Every
    file is hashed here (and must match its sha256 in the manifest, as `verify` checks), so this reads the whole
    bundle. Record it where the app's code or configuration lives, not next to the bundle: a supplier who can change
    the bundle can change a digest stored inside it.
    """
    manifest = read_manifest(bundle_dir, verify=False)
    return _digest(manifest, verify_files(manifest, manifest.data["files"]))


def check_digest(bundle_dir: str | Path, expected: str) -> str:
    """The bundle's digest, or BundleError when it is not `expected` ("sha256:<hex>" or just the hex)."""
    want = str(expected).strip().lower()
    want = want if want.startswith(DIGEST_PREFIX) else DIGEST_PREFIX + want
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", want):
        raise BundleError(f"expected digest {expected!r} is not sha256:<64 hex digits>; copy the digest that "
                          "`python -m compress verify BUNDLE` printed")
    digest = bundle_digest(bundle_dir)
    if digest != want:
        raise BundleError(f"bundle {bundle_dir} has digest {digest}, not the expected {want}: it is not the bundle "
                          "that was pinned (re-exported, edited or replaced); get the pinned bundle again, or pin the "
                          "new digest once you trust where this one came from")
    return digest


def _digest(manifest: Manifest, hashes: dict[str, str]) -> str:
    """`bundle_digest` from the files' sha256 ({path: hex}, every file the manifest lists)."""
    lines = [f"{MANIFEST} {sha256_file(manifest.path / MANIFEST)}\n"]
    lines += [f"{rel} {hashes[rel]}\n" for rel in sorted(manifest.data["files"])]
    return DIGEST_PREFIX + hashlib.sha256(DIGEST_VERSION + "".join(lines).encode()).hexdigest()


# --- what the manifest says: checked at read time ------------------------------------------------------------------

Fail = Callable[..., NoReturn]  # raises BundleError(problem; fix) about one manifest

# The generation settings of a causal LM (the manifest's `generation` defaults and what an app passes to generate):
# name -> (what a valid value is, the check). serve.generation.GenerationSettings applies the same rules.
GENERATION_RULES: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "temperature": ("a number >= 0 (0: greedy)", lambda v: _is_number(v) and v >= 0),
    "top_k": ("an integer >= 0 (0: off)", lambda v: _is_int(v) and v >= 0),
    "top_p": ("a number in (0, 1] (1: off)", lambda v: _is_number(v) and 0 < v <= 1),
    "repetition_penalty": ("a number > 0 (1: off)", lambda v: _is_number(v) and v > 0),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
    "seed": ("an integer >= 0, or None for a random seed", lambda v: v is None or (_is_int(v) and v >= 0)),
}


def generation_setting_problem(name: str, value: Any) -> str | None:
    """What is wrong with one generation setting ("max_new_tokens must be an integer >= 1; got '5' (str)"), or None."""
    rule, ok = GENERATION_RULES[name]
    return None if ok(value) else f"{name} must be {rule}; got {value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def validate_manifest(manifest: Manifest) -> None:
    """Check what the manifest says, beyond its format: each variant's graphs and session settings, the labels
    against the logits, and the sections its task needs (tokenizer and text, preprocessing, cache and generation).
    Raises BundleError naming the first problem. Keys this version does not know are ignored, except inside
    `session` (an unknown setting there would change how the graph runs)."""
    data, path = manifest.data, manifest.path / MANIFEST

    def fail(problem: str, fix: str = "re-export the bundle") -> NoReturn:
        raise BundleError(f"{path}: {problem}; {fix}")

    for rel, digest in data["files"].items():
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            fail(f"files[{rel!r}] is {digest!r}, not a sha256 (64 hex digits)")
    labels = data.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(isinstance(n, str) for n in labels):
            fail(f"'labels' must be a non-empty list of label names or null, got {labels!r}")
        repeated = sorted(n for n, count in Counter(labels).items() if count > 1)
        if repeated:
            fail(f"'labels' repeats {repeated}: each class needs its own name")
    for name, variant in data["variants"].items():
        _validate_variant(manifest, name, variant, fail)
    if manifest.task == Task.IMAGE_CLASSIFICATION:
        _validate_preprocessing(manifest, fail)
    else:
        _validate_text(data, fail)
    if manifest.task == Task.CAUSAL_LM:
        _validate_causal_lm(manifest, fail)


def _validate_variant(manifest: Manifest, name: str, variant: dict[str, Any], fail: Fail) -> None:
    """One variant: its graphs' tensors, its session settings, and (classifiers, regression) the logits' width."""
    roles = ("model", "decoder") if manifest.task == Task.CAUSAL_LM else ("model",)
    graphs = variant["graphs"]
    for role in roles:
        if role not in graphs:
            fail(f"variant {name!r} has no {role!r} graph (graphs: {', '.join(graphs)}); a {manifest.task} bundle "
                 f"needs {' and '.join(roles)}")
    for role, graph in graphs.items():
        for kind in ("inputs", "outputs"):
            tensors = graph.get(kind)
            if not isinstance(tensors, list) or not tensors or not all(
                    isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list)
                    for t in tensors):
                fail(f"variant {name!r}: the {role} graph's {kind!r} must be a list of {{name, dtype, shape}}")
    session = variant.get("session")
    if session is not None:
        if not isinstance(session, dict):
            fail(f"variant {name!r}: 'session' must be a mapping of ONNX Runtime settings, got {session!r}")
        unknown = sorted(set(session) - set(SESSION_KEYS))
        if unknown:
            fail(f"variant {name!r} asks for session settings {unknown}, which this tuneforge does not know (known: "
                 f"{', '.join(SESSION_KEYS)})", "upgrade tuneforge, or re-export the bundle with this version")
        level = session.get("graph_optimization_level")
        if level is not None and level not in ORT_LEVELS:
            fail(f"variant {name!r}: session graph_optimization_level {level!r} is not one of "
                 f"{', '.join(ORT_LEVELS)}")
        disabled = session.get("disabled_optimizers")
        if disabled is not None and (not isinstance(disabled, list) or not all(isinstance(o, str) for o in disabled)):
            fail(f"variant {name!r}: session disabled_optimizers must be a list of optimizer names, got {disabled!r}")
    if manifest.task == Task.CAUSAL_LM:
        return
    shape = graphs["model"]["outputs"][0]["shape"]  # the runtime reads the first output: logits [batch, labels]
    width = shape[-1] if shape else None
    labels = manifest.data.get("labels")
    want = 1 if manifest.task == Task.TEXT_REGRESSION else len(labels) if labels else None
    if _is_int(width) and want is not None and width != want:
        what = "one value (regression)" if manifest.task == Task.TEXT_REGRESSION else \
            f"{want} labels {labels}" if want <= 10 else f"{want} labels"
        fail(f"variant {name!r} outputs {width} logits per input but the manifest has {what}")


def _validate_preprocessing(manifest: Manifest, fail: Fail) -> None:
    """An image bundle's `preprocessing` (the JSON form of serve.bundle.preprocessing.PreprocessingSpec) and the
    graph input it feeds: [batch, channels, height, width]."""
    spec = manifest.data.get("preprocessing")
    if not isinstance(spec, dict):
        fail(f"an image bundle needs 'preprocessing' {{size, color_mode, mean, std, resample, rescale}}, got {spec!r}")
    unknown, missing = sorted(set(spec) - set(PREPROCESSING_KEYS)), [k for k in PREPROCESSING_KEYS[:4] if k not in spec]
    if unknown or missing:
        fail(f"'preprocessing' has unknown keys {unknown} / lacks {missing} (keys: {', '.join(PREPROCESSING_KEYS)})")
    size, mode = spec["size"], spec["color_mode"]
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(s) and s >= 1 for s in size):
        fail(f"preprocessing size must be [height, width] in pixels, got {size!r}")
    if mode not in ("L", "RGB"):
        fail(f"preprocessing color_mode must be 'L' or 'RGB', got {mode!r}")
    channels = 1 if mode == "L" else 3
    for key in ("mean", "std"):
        values = spec[key]
        if not isinstance(values, list) or len(values) != channels or not all(_is_number(v) for v in values):
            fail(f"preprocessing {key} must be {channels} number(s) for color mode {mode}, got {values!r}")
    if min(spec["std"]) <= 0:
        fail(f"preprocessing std must be positive, got {spec['std']}")
    if spec.get("resample", "bilinear") not in RESAMPLE_NAMES:
        fail(f"preprocessing resample must be one of {', '.join(RESAMPLE_NAMES)}, got {spec['resample']!r}")
    rescale = spec.get("rescale", 1 / 255)
    if not _is_number(rescale) or rescale <= 0:
        fail(f"preprocessing rescale must be a positive number, got {rescale!r}")
    for name, variant in manifest.variants.items():
        shape = variant["graphs"]["model"]["inputs"][0]["shape"]
        if len(shape) == 4 and any(_is_int(got) and got != want for got, want in zip(shape[1:], [channels, *size],
                                                                                      strict=True)):
            fail(f"variant {name!r} takes images of shape {shape[1:]} (channels, height, width) but preprocessing "
                 f"makes {[channels, *size]}")


def _validate_text(data: dict[str, Any], fail: Fail) -> None:
    """The `text` and `tokenizer` sections of a text task."""
    text, tokenizer = data.get("text"), data.get("tokenizer")
    if text is not None:
        if not isinstance(text, dict):
            fail(f"'text' must be a mapping {{max_length, text_column, text_pair_column}}, got {text!r}")
        length, pair = text.get("max_length"), text.get("text_pair_column")
        if length is not None and not (_is_int(length) and length >= 1):
            fail(f"text max_length must be a positive integer or null, got {length!r}")
        if pair is not None and not isinstance(pair, str):
            fail(f"text text_pair_column must be a column name or null, got {pair!r}")
    if tokenizer is not None and not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("file", ""), str)):
        fail(f"'tokenizer' must be a mapping with the tokenizer's 'file', got {tokenizer!r}")


def _validate_causal_lm(manifest: Manifest, fail: Fail) -> None:
    """`cache` (the decoder graph's past/present names and shapes), `generation` and `chat_template`."""
    data = manifest.data
    cache, generation = data.get("cache"), data.get("generation")
    if not isinstance(cache, dict):
        fail(f"a causal-lm bundle needs 'cache' {{num_layers, num_kv_heads, head_dim, dtype, past_key, past_value, "
             f"present_key, present_value}}, got {cache!r}")
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if not (_is_int(cache.get(key)) and cache[key] >= 1):
            fail(f"cache {key} must be a positive integer, got {cache.get(key)!r}")
    if cache.get("dtype") not in CACHE_DTYPES:
        fail(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache.get('dtype')!r}")
    patterns = [cache.get(key) for key in ("past_key", "past_value", "present_key", "present_value")]
    for key, pattern in zip(("past_key", "past_value", "present_key", "present_value"), patterns, strict=True):
        if not isinstance(pattern, str) or "{i}" not in pattern:
            fail(f"cache {key} must be a tensor name pattern with {{i}} (e.g. 'past_key_values.{{i}}.key'), got "
                 f"{pattern!r}")
    for name, variant in manifest.variants.items():
        decoder = variant["graphs"]["decoder"]
        have = {t["name"] for t in decoder["inputs"]} | {t["name"] for t in decoder["outputs"]}
        # Lazily, layer by layer: a manifest claiming 10**9 layers fails at the first missing name.
        wanted = itertools.chain(["logits"], (p.replace("{i}", str(i)) for i in range(cache["num_layers"])
                                              for p in patterns))
        lacking = next((n for n in wanted if n not in have), None)
        if lacking is not None:
            fail(f"variant {name!r}: the decoder graph has no tensor {lacking!r}, which 'cache' names "
                 f"({cache['num_layers']} layers)")
        layer = re.compile("|".join(re.escape(p).replace(r"\{i\}", r"(\d+)") for p in patterns[:2]))
        extra = [t["name"] for t in decoder["inputs"] if (m := layer.fullmatch(t["name"]))
                 and int(next(g for g in m.groups() if g is not None)) >= cache["num_layers"]]
        if extra:
            fail(f"variant {name!r}: the decoder graph takes {extra[0]!r} but 'cache' has only "
                 f"{cache['num_layers']} layers")
    if not isinstance(generation, dict):
        fail(f"a causal-lm bundle needs 'generation' (defaults, pad_token_id, eos_token_id), got {generation!r}")
    for key, value in generation.items():
        if key in GENERATION_RULES and value is not None and (problem := generation_setting_problem(key, value)):
            fail(f"generation {problem}")
    if not _is_int(generation.get("pad_token_id")):
        fail(f"generation pad_token_id must be a token id, got {generation.get('pad_token_id')!r}")
    eos = generation.get("eos_token_id")
    if eos is not None and not (_is_int(eos) or (isinstance(eos, list) and eos and all(_is_int(e) for e in eos))):
        fail(f"generation eos_token_id must be a token id, a list of them or null, got {eos!r}")
    positions = generation.get("max_positions")
    if positions is not None and not (_is_int(positions) and positions >= 2):
        fail(f"generation max_positions must be an integer >= 2 or null, got {positions!r}")
    if not isinstance(data.get("chat_template"), str | None):
        fail(f"'chat_template' must be a Jinja template string or null, got {type(data['chat_template']).__name__}")


def write_manifest(bundle_dir: str | Path, data: dict[str, Any]) -> None:
    """Write manifest.json atomically (temp file, fsync, rename): a reader sees the old or the new one, never half."""
    path = Path(bundle_dir) / MANIFEST
    tmp = path.with_name(f".tmp-{MANIFEST}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    replace_file(tmp, path)


def new_manifest(task: str, **fields: Any) -> dict[str, Any]:
    """A manifest dict with the format header and no variants yet; `fields` are the task-level sections."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "created": utc_now(), "task": task, **fields,
            "default_variant": None, "variants": {}, "files": {}}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_info() -> dict[str, Any]:
    """CPU model and the ISA flags that matter for ONNX Runtime kernels (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model, "machine": platform.machine(), "logical_cores": os.cpu_count(),
            "flags": {name: name in flags for name in ISA_FLAGS}}


def library_versions(names: tuple[str, ...] = ("tuneforge", "torch", "transformers", "onnx", "onnxruntime",
                                                  "tokenizers", "numpy")) -> dict[str, str | None]:
    """Installed distribution versions (None where not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """What made a variant: library versions, CPU model and ISA flags, Python and platform."""
    return {"libraries": library_versions(), "cpu": cpu_info(), "python": sys.version.split()[0],
            "platform": platform.platform()}
