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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serve.bundle.errors import BundleError
from serve.bundle.folders import replace_file
from serve.bundle.tasks import TASKS, Task

FORMAT = "tuneforge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
# ISA extensions that decide which int8 / fp32 kernels ONNX Runtime can use (names as in /proc/cpuinfo).
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


def verify_files(manifest: Manifest, names: Iterable[str]) -> None:
    """Check that these files (paths relative to the bundle) match their sha256 in the manifest; an app that loads one
    variant checks just its files rather than every graph of the bundle."""
    files: dict[str, str] = manifest.data["files"]
    for rel in names:
        if rel not in files:
            raise BundleError(f"bundle {manifest.path}: {rel} is not listed in {MANIFEST}; re-export the bundle")
        if sha256_file(manifest.path / rel) != files[rel]:
            raise BundleError(f"bundle {manifest.path}: {rel} does not match its sha256 in {MANIFEST} (changed or "
                              "corrupted after export); re-export the bundle")


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
