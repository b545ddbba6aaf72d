"""Int8 quantization: ONNX Runtime dynamic and static (QDQ) int8 of bundle graphs behind the numeric and task-metric
gates, walking a ladder of safer settings when a gate fails; and PyTorch dynamic int8 for users who stay in PyTorch.

What makes int8 fast on an x86 CPU (measured by bench/compression.py on MiniLM, one thread, AVX-512 VNNI):
  - int8 weights (s8) with uint8 activations: ONNX Runtime's x86 int8 GEMMs are u8 x s8 (VNNI's vpdpbusd). uint8
    weights ran ~1.6x slower; int8 activations in QDQ graphs (s8 x s8) ~6x slower.
  - dynamic quantization of the optimized graph: fused attention becomes one QAttention (one quantized QKV GEMM),
    embeddings QEmbedLayerNormalization, ~4x fewer nodes than the plain export; without the SkipLayerNormalization and
    BiasGelu fusions (compress.optimize), whose CPU kernels are slower and which keep biases out of the int8 GEMMs.
  - per-channel weights cost ~10% at batch 1 and buy accuracy (MiniLM SST-2: -1.5 points per tensor, +0.6 per
    channel), so the ladder tries per-tensor first and moves to per-channel only when the metric gate asks for it.
  - static QDQ needs the fp32 graph (calibration cannot run through fused contrib ops) and was no faster than
    dynamic on transformers; it is the fast path for CNNs (QLinearConv).

Each attempt is written to a work folder, checked against the fp32 graph on the parity samples, scored on the eval
split, and either returned (the caller adds it to the bundle) or recorded with its reason.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from compress.errors import ExportError, ParityError, require
from compress.metric_gate import GateConfig, metric_verdict
from compress.parity import ParityConfig, check_graph, open_session
from compress.tasks import Feeds, TaskExport

logger = logging.getLogger(__name__)

# Ops the ladder keeps in fp32 once per-channel weights were not enough: normalisations, softmax, GELU and embedding
# lookups carry the widest activation ranges. (Dynamic int8 quantizes only MatMul/Attention/Gather/EmbedLayerNorm and
# convolutions, so for it this rung keeps the embeddings in fp32.)
SENSITIVE_OPS = ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "Softmax", "Gelu",
                 "BiasGelu", "FastGelu", "Gather")
QUANTIZED_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QAttention", "QEmbedLayerNormalization",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear", "QGemm")
# Static int8 quantizes the compute ops and the activations / pooling between convolutions (so a CNN stays int8 from
# one QLinearConv to the next), not ORT's default of every op it can (Add, Mul, Softmax, Reshape...): on MiniLM SST-2
# that default lost 7.6 points and ran slower; MatMul/Gemm only lost 1.8.
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool")
# What dynamic int8 quantizes by default (onnxruntime's IntegerOps registry; Gemm is split into MatMul + Add first).
DYNAMIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Attention", "LSTM", "Gather", "Transpose", "EmbedLayerNormalization")
CALIBRATION_CHUNK = 16  # examples per calibration pass (activations of a pass are held in memory)


@dataclass
class QuantizeConfig:
    """One quantized variant: its name, method and settings, and whether to retry along the ladder."""

    name: str = "int8-dynamic"
    method: Literal["dynamic", "static"] = "dynamic"
    # The graph to quantize. auto: the optimized variant for dynamic (when the bundle has one), fp32 for static.
    source: Literal["auto", "fp32", "optimized"] = "auto"
    per_channel: bool = False  # one weight scale per output channel instead of per tensor
    reduce_range: bool = False  # 7-bit weights: avoids u8 x s8 overflow on CPUs without VNNI (AVX2-only)
    exclude_op_types: list[str] = field(default_factory=list)  # op types left in fp32
    # Op types to quantize; None: all that ONNX Runtime supports (dynamic), STATIC_OP_TYPES (static).
    op_types: list[str] | None = None
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # static only
    calibration_samples: int = 128  # static only: examples drawn (seeded) from the train split
    percentile: float = 99.999  # calibration_method=percentile: the activation range kept
    ladder: bool = True  # on a failed gate, retry with safer settings (see `ladder`)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in ("fp32", "optimized"):
            raise ValueError(f"name {self.name!r} cannot name a quantized variant; use e.g. int8-dynamic")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be at least 1, got {self.calibration_samples}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.method == "static" and self.source == "optimized":
            raise ValueError("static quantization calibrates the fp32 graph (fused contrib ops cannot be calibrated); "
                             "set source: fp32 or auto")


@dataclass(frozen=True)
class Settings:
    """The settings of one attempt."""

    method: str
    per_channel: bool
    reduce_range: bool
    exclude_op_types: tuple[str, ...]


@dataclass
class Outcome:
    """A quantization stage's result: the passing graphs (in the work folder) with their records, or why none passed."""

    name: str
    files: dict[str, Path] | None
    quantization: dict[str, Any]  # the manifest record, with every attempt under "ladder"
    parity: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    metric_gate: dict[str, Any] | None = None
    reason: str | None = None  # why it was dropped


def ladder(config: QuantizeConfig) -> list[tuple[str, Settings]]:
    """The attempts in order: the configured settings, then per-channel weights, sensitive ops in fp32, 7-bit weights,
    each keeping the steps before it, and (static) per-channel dynamic int8; steps that change nothing are left out."""
    settings = Settings(config.method, config.per_channel, config.reduce_range, tuple(config.exclude_op_types))
    rungs = [("as configured", settings)]
    if not config.ladder:
        return rungs
    # The last rung restarts from the configured exclusions: the ones added for static's sake would only cost dynamic
    # int8 size and speed (fp32 embeddings), and per-channel dynamic int8 is the setting that held accuracy best.
    steps: list[tuple[str, Callable[[Settings], Settings]]] = [
        ("per-channel weights", lambda s: replace(s, per_channel=True)),
        ("sensitive ops in fp32", lambda s: replace(s, exclude_op_types=tuple(dict.fromkeys(
            (*s.exclude_op_types, *SENSITIVE_OPS))))),
        ("7-bit weights (reduce_range)", lambda s: replace(s, reduce_range=True)),
    ]
    if config.method == "static":
        steps.append(("dynamic instead of static", lambda s: Settings("dynamic", True, config.reduce_range,
                                                                      tuple(config.exclude_op_types))))
    for label, step in steps:
        changed = step(settings)
        if changed != settings:
            rungs.append((label, changed))
            settings = changed
    return rungs


def quantize_gated(task: TaskExport, sources: dict[str, dict[str, Path]], reference_metrics: dict[str, Any] | None,
                   config: QuantizeConfig, gate: GateConfig, workdir: Path) -> Outcome:
    """Quantize the bundle's graphs per `config`, walking the ladder until an attempt passes both gates.

    sources: {"fp32": {role: path}, "optimized": {role: path}} (optimized optional); the fp32 graphs are also the
    reference of the numeric check and `reference_metrics` (the fp32 graph's eval metrics) of the metric gate.
    """
    if task.eval_data() is None:
        raise ExportError(f"cannot gate {config.name!r}: {task.run.run_dir} has no readable eval split; point the "
                          "compress config's `data` overrides at one (e.g. data: {eval: path/to/test.csv})")
    if config.method == "static" and "decoder" in sources["fp32"]:
        raise ExportError(f"{config.name!r}: static int8 is not supported for causal LMs (no calibration reader for "
                          "the KV-cache decoder); use method: dynamic")
    metric, higher = gate.resolve_metric(task.primary_metric)
    sanity = gate.int8_parity(task.parity)
    references = {role: _Reference(path) for role, path in sources["fp32"].items()}
    calibration: tuple[list[Feeds], str] | None = None
    # Activation ranges depend on the graph and the calibration data only, not on the rung: measured once per role.
    ranges = {role: workdir / f".ranges-{config.name}-{role}.json" for role in sources["fp32"]}
    attempts: list[dict[str, Any]] = []
    tried: dict[tuple, int] = {}  # what each attempt actually changes in the graph -> its number
    skipped: list[dict[str, Any]] = []
    for rung, settings in ladder(config):
        source = _pick_source(settings.method, config.source, sources)
        key = _effect(settings, source, sources[source]["model"], config.op_types)
        if key in tried:  # e.g. fp32 kept for op types this method does not quantize anyway
            skipped.append({"rung": rung, "reason": f"the same graph as attempt {tried[key]}"})
            continue
        number = tried[key] = len(attempts) + 1
        if settings.method == "static" and calibration is None:
            calibration = task.calibration_inputs(config.calibration_samples)
        files = {role: workdir / f"{config.name}.try{number}{'.decoder' if role == 'decoder' else ''}.onnx"
                 for role in sources[source]}
        start = time.perf_counter()
        ops = {role: quantize_graph(sources[source][role], path, settings, calibration=calibration,
                                    calibration_method=config.calibration_method, percentile=config.percentile,
                                    op_types=config.op_types, ranges=ranges[role])
               for role, path in files.items()}
        attempt = {"attempt": number, "rung": rung, "source": source, **asdict(settings),
                   "exclude_op_types": list(settings.exclude_op_types), "quantized_ops": ops}
        attempts.append(attempt)
        try:
            parity = int8_parity(files, references, task, sanity, f"{config.name} (attempt {number}, {rung})")
        except ParityError as err:
            # The message's first line, and the worst output when it lists them.
            lines = str(err).splitlines()
            attempt.update(passed=False, reason="numeric check against fp32 failed: " + " ".join(
                line.strip() for line in lines[:2]),
                           seconds=round(time.perf_counter() - start, 2))
            _remove(files)
            continue
        metrics = task.evaluate(files["model"])
        verdict = metric_verdict(metrics, reference_metrics, metric=metric, higher_is_better=higher,
                                 max_relative_drop=gate.max_relative_drop, reference="fp32")
        attempt.update(metric=metric, value=verdict["value"], relative_drop=verdict["relative_drop"],
                       passed=verdict["passed"], top1_agreement=parity["top1_agreement"],
                       max_abs_diff=parity["max_abs_diff"], seconds=round(time.perf_counter() - start, 2),
                       reason=None if verdict["passed"] else (
                           f"{metric} {verdict['value']:.4g} vs fp32 {verdict['reference_value']:.4g}: "
                           f"{verdict['relative_drop']:.2%} worse, more than the {gate.max_relative_drop:.2%} allowed"))
        logger.info("%s attempt %d (%s): %s %.4g (%+.2f%% vs fp32) -> %s", config.name, number, rung, metric,
                    verdict["value"], -100 * verdict["relative_drop"], "passed" if verdict["passed"] else "failed")
        if verdict["passed"]:
            record = _record(settings, source, config, ops, calibration if settings.method == "static" else None,
                             attempts, skipped)
            _remove(ranges)
            return Outcome(config.name, files, record, parity, metrics, verdict)
        _remove(files)
    _remove(ranges)
    requested = ladder(config)[0][1]
    record = _record(requested, _pick_source(requested.method, config.source, sources), config, {}, None, attempts,
                     skipped)
    reason = (f"all {len(attempts)} attempt(s) failed their gates; the last: {attempts[-1]['reason']}")
    logger.warning("%s dropped: %s", config.name, reason)
    return Outcome(config.name, None, record, reason=reason)


def quantize_graph(src: Path, dst: Path, settings: Settings, *, calibration: tuple[list[Feeds], str] | None = None,
                   calibration_method: str = "minmax", percentile: float = 99.999, op_types: list[str] | None = None,
                   ranges: Path | None = None) -> dict[str, int]:
    """Write the int8 graph of `src` to `dst` with `settings`; return the quantized operators it holds ({op: n}).

    Static: the activation ranges are measured on `calibration` into the file `ranges` (reused when it exists: the
    same graph and data give the same ranges, whatever the per-channel / exclusion settings)."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    staged = dst.with_name(f".src-{dst.name}")
    with _quiet_quantizer():
        if settings.method == "static":
            # ONNX shape inference + basic ORT optimizations: the static quantizer needs every tensor's type.
            quant_pre_process(str(src), str(staged), skip_symbolic_shape=True)
            model = onnx.load(str(staged))
        else:
            model = onnx.load(str(src))
        excluded = _name_nodes_and_select(model, settings.exclude_op_types)
        onnx.save(model, str(staged))
        if op_types is None and settings.method == "static":
            op_types = list(STATIC_OP_TYPES)
        common = {"per_channel": settings.per_channel, "reduce_range": settings.reduce_range,
                  "weight_type": QuantType.QInt8, "nodes_to_exclude": excluded, "op_types_to_quantize": op_types}
        if settings.method == "dynamic":
            # Fused contrib ops (Attention, EmbedLayerNormalization) defeat ONNX type inference: their outputs are
            # float32, which this states.
            quantize_dynamic(str(staged), str(dst), **common,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
        else:
            if calibration is None:
                raise ValueError("static quantization needs calibration inputs")
            cache = ranges or dst.with_name(f".ranges-{dst.stem}.json")
            if not cache.is_file():
                calibrate(staged, calibration[0], cache, method=calibration_method, percentile=percentile,
                          op_types=op_types)
            quantize_static(str(staged), str(dst), None, quant_format=QuantFormat.QDQ, calibration_cache_path=cache,
                            activation_type=QuantType.QUInt8, calibrate_method=_calibration_method(calibration_method),
                            **common)
            if ranges is None:
                cache.unlink()
    staged.unlink()
    return quantized_ops(dst)


def calibrate(model_path: Path, feeds: list[Feeds], cache: Path, *, method: str, percentile: float = 99.999,
              op_types: list[str] | None = None) -> None:
    """Activation ranges of `model_path` on the calibration inputs, written as an onnxruntime calibration cache.

    Run here rather than inside quantize_static for two onnxruntime 1.32 defects: quantize_static gives Entropy 128
    histogram bins for 128 quantized bins, which leaves one candidate threshold (the full range: MinMax again), and
    CalibMaxIntermediateOutputs drops every full chunk of activations instead of folding it in. Here Entropy gets 512
    bins, so its KL search tries 192 thresholds per tensor (2048 bins, as TensorRT, cost ~0.8 s a tensor in
    onnxruntime's Python search), and activations are folded in every CALIBRATION_CHUNK examples."""
    onnx = require("onnx")
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    settings = {"minmax": {}, "entropy": {"num_bins": 512, "num_quantized_bins": 128},
                "percentile": {"num_bins": 2048, "percentile": percentile}}[method]
    model = onnx.load(str(model_path), load_external_data=False)
    with tempfile.TemporaryDirectory(prefix=".calibrate-", dir=cache.parent) as tmp:
        calibrator = create_calibrator(model_path, op_types, augmented_model_path=Path(tmp) / "augmented.onnx",
                                       calibrate_method=_calibration_method(method), extra_options=settings)
        # The histogram collectors stack a pass's activations into one array: texts of different lengths go one per
        # pass (histograms are merged across passes; MinMax ranges too).
        chunk = CALIBRATION_CHUNK if method == "minmax" else 1
        for start in range(0, len(feeds), chunk):
            calibrator.collect_data(_reader(feeds[start:start + chunk], model))
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator  # its session holds the augmented model open


def quantized_ops(path: Path) -> dict[str, int]:
    """{op: count} of the quantized operators (QOperator and QDQ forms) in an ONNX file."""
    from compress.optimize import op_counts

    return {op: n for op, n in sorted(op_counts(path).items()) if op in QUANTIZED_OPS or op.startswith("QLinear")}


def int8_parity(files: dict[str, Path], references: dict[str, Any], task: TaskExport, config: ParityConfig,
                label: str) -> dict[str, Any]:
    """The numeric sanity check of int8 graphs against the fp32 graphs (`_Reference`s) on the parity cases: every
    output within the tolerances, and top-1 agreement pooled over all compared positions (a parity case may hold a
    single one, where a lone flip would read as 0%). The record is shaped like the export gate's; raises ParityError."""
    tolerances = replace(config, min_top1_agreement=0.0)
    records = {role: check_graph(open_session(path), references[role], task.cases[role], config=tolerances,
                                 label=f"{label}, {role} graph", reference_name="the fp32 graph")
               for role, path in files.items()}
    agree = positions = 0.0
    for record in records.values():
        for case in record["cases"]:
            if "top1_agreement" in case:
                agree += case["top1_agreement"] * case["positions"]
                positions += case["positions"]
    top1 = agree / positions if positions else None
    if top1 is not None and top1 < config.min_top1_agreement:
        raise ParityError(f"{label}: top-1 agrees with the fp32 graph on {top1:.1%} of {int(positions)} parity "
                          f"positions, below {config.min_top1_agreement:.0%}; it was not written")
    return {"passed": True, "reference": "fp32", "inputs": task.samples_source, "atol": config.atol,
            "rtol": config.rtol, "min_top1_agreement": config.min_top1_agreement, "top1_pooled": True,
            "max_abs_diff": max(r["max_abs_diff"] for r in records.values()),
            "max_rel_diff": max(r["max_rel_diff"] for r in records.values()),
            "top1_agreement": top1, "positions": int(positions), "graphs": records}


def quantize_torch_dynamic(model: Any) -> Any:
    """A copy of `model` with every nn.Linear in PyTorch dynamic int8 (per-tensor int8 weights, activations quantized
    per batch at run time), for users who stay in PyTorch. torch.ao.quantization is deprecated in favour of torchao
    but still works in torch 2.13; the report measures it, bundles never hold it."""
    import copy

    import torch

    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = next(e for e in ("x86", "fbgemm", "qnnpack", *engines) if e in engines)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                                      dtype=torch.qint8)


class _Reference:
    """The fp32 graph as a parity reference: feeds -> every output by name (session opened on first use)."""

    def __init__(self, path: Path):
        self.path, self.session = path, None

    def __call__(self, feeds: Feeds) -> dict[str, Any]:
        if self.session is None:
            self.session = open_session(self.path)
        wanted = {i.name for i in self.session.get_inputs()}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {k: v for k, v in feeds.items() if k in wanted}), strict=True))


def _pick_source(method: str, wanted: str, sources: dict[str, dict[str, Path]]) -> str:
    if wanted == "auto":
        return "optimized" if method == "dynamic" and sources.get("optimized") else "fp32"
    if wanted == "optimized" and method == "static":
        return "fp32"  # a ladder's static rungs before "dynamic instead of static"; the config check refuses the rest
    if not sources.get(wanted):
        raise ExportError(f"quantization source {wanted!r} is not in the bundle; add an `optimize` stage before it "
                          "or set source: auto")
    return wanted


def _effect(settings: Settings, source: str, graph: Path, op_types: list[str] | None) -> tuple:
    """What an attempt's settings change in the quantized graph: exclusions count only for op types that the graph
    holds and the method would quantize."""
    from compress.optimize import op_counts

    quantizable = set(op_types or (STATIC_OP_TYPES if settings.method == "static" else DYNAMIC_OP_TYPES))
    present = set(op_counts(graph))
    excluded = frozenset(t for t in settings.exclude_op_types if t in quantizable and t in present)
    return settings.method, settings.per_channel, settings.reduce_range, excluded, source


def _record(settings: Settings, source: str, config: QuantizeConfig, ops: dict[str, dict[str, int]],
            calibration: tuple[list[Feeds], str] | None, attempts: list[dict[str, Any]],
            skipped: list[dict[str, Any]]) -> dict[str, Any]:
    from importlib import metadata

    static = settings.method == "static"
    return {"method": settings.method, "format": "QDQ" if static else "QOperator", "source": source,
            "weight_type": "int8", "activation_type": "uint8, calibrated ranges" if static else
            "uint8, range computed per batch at run time", "per_channel": settings.per_channel,
            "reduce_range": settings.reduce_range, "exclude_op_types": list(settings.exclude_op_types),
            "op_types": config.op_types or (list(STATIC_OP_TYPES) if static else "all supported (ORT default)"),
            "calibration": {"method": config.calibration_method, "samples": len(calibration[0]),
                            "source": calibration[1], **({"percentile": config.percentile}
                                                         if config.calibration_method == "percentile" else {})}
            if calibration else None,
            "quantized_ops": ops, "requested": {"method": config.method, "per_channel": config.per_channel,
                                                "reduce_range": config.reduce_range,
                                                "exclude_op_types": list(config.exclude_op_types)},
            "library": f"onnxruntime.quantization {metadata.version('onnxruntime')}", "ladder": attempts,
            "skipped_rungs": skipped}


def _name_nodes_and_select(model: Any, op_types: tuple[str, ...]) -> list[str]:
    """Give unnamed nodes a name (exclusion works by name) and return the names of the nodes of `op_types`."""
    names = {node.name for node in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_tf{i}_{k}" for k in range(len(names) + 1)
                             if f"{node.op_type}_tf{i}_{k}" not in names)
    return [node.name for node in model.graph.node if node.op_type in op_types]


def _reader(feeds: list[Feeds], model: Any) -> Any:
    """An onnxruntime CalibrationDataReader over the calibration inputs (only the graph's own inputs)."""
    from onnxruntime.quantization import CalibrationDataReader

    wanted = {i.name for i in model.graph.input}

    picked = [{k: v for k, v in f.items() if k in wanted} for f in feeds]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(picked)

        def get_next(self) -> Feeds | None:
            return next(self.items, None)

    return Reader()


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _remove(files: dict[str, Path]) -> None:
    for path in files.values():
        path.unlink(missing_ok=True)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs on the root logger for every per-channel LayerNorm weight and fused op output it
    cannot type ("please run pre-processing", "axis out of range"); they are expected here, so they go to debug."""

    def demote(record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and record.levelno < logging.ERROR:
            logger.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True

    root = logging.getLogger()
    root.addFilter(demote)
    printed = io.StringIO()  # the calibrators print their progress ("Collecting tensor data...")
    try:
        with redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(demote)
        if printed.getvalue():
            logger.debug("onnxruntime.quantization printed: %s", printed.getvalue())
