"""The compress pipeline: a run directory through a list of stages to one bundle and its trade-off report.

    python -m compress run --config recipes/configs/compress/text_default.yaml [key.sub=value ...]
    python recipes/compression.py --config recipes/configs/compress/text_default.yaml      # the same code

The config's `stages` are applied in order; each entry names one stage kind and its settings (`- quantize: {...}`):

    torch     PyTorch baselines of the current model, measured like the variants: fp32 eager (transformers' default
              attention) and, with int8_dynamic, torch.ao dynamic int8 of its Linear layers. Not written to the bundle.
    export    the fp32 ONNX graphs behind the parity gate (the first export creates the bundle)
    optimize  the optimized variant (ONNX Runtime fusions), parity-gated against PyTorch
    quantize  an int8 variant (compress.quantize.QuantizeConfig) behind the numeric and task-metric gates; a variant
              that fails every rung of the ladder is dropped and recorded under the manifest's `rejected`

    prune     a pruned run (compress.prune.PruneConfig: structured heads / FFN neurons / channels, or unstructured),
              with its recovery fine-tune
    distill   a distilled student run (compress.distill.DistillConfig) with the current run as its teacher
    source    back to the source run: `- prune: {...}`, `- export: {}`, `- source: {}`, `- distill: {...}` puts a
              pruned and a distilled model of the same run side by side in one report

Run-to-run stages (prune, distill) take the current run directory and write a new one (kept in `<out>-runs/`); the
stages after them work on the new model and, when the bundle already holds another model, prefix their variant names
with the stage's ("pruned-fp32", "pruned-int8-dynamic").

After the stages: every variant and baseline is timed on the same inputs (compress.latency), the default variant is
chosen, and report.md / report.json / tradeoff.png are written (compress.report). The bundle is built in a temp folder
next to `out` and renamed into place only when everything passed; a stage that fails leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.bundle import (
    ExportConfig,
    Exported,
    add_variant,
    bundle_destination,
    edit_manifest,
    export_run,
    optimize_variant,
    staged,
)
from compress.distill import DistillConfig, distill_run
from compress.errors import ExportError
from compress.export import DEFAULT_OPSET
from compress.latency import LatencyConfig, measure, ort_runner, torch_runner
from compress.metric_gate import GateConfig
from compress.optimize import DEFAULT_SKIP_FUSIONS, session_settings
from compress.parity import ParityConfig
from compress.prune import PruneConfig, prune_run
from compress.quantize import QuantizeConfig, quantize_gated, quantize_torch_dynamic
from compress.source import Run, load_model, load_samples, read_run
from compress.tasks import TaskExport, prepare_task
from compress.training import Trainer
from finetune.config import config_from_dict, config_to_dict
from finetune.errors import ConfigError
from serve.bundle.folders import relative_path
from serve.bundle.manifest import Manifest, read_manifest
from serve.bundle.records import VariantRecord

logger = logging.getLogger(__name__)


@dataclass
class TorchStage:
    """Measure the current model in PyTorch (rows of the report; nothing is written to the bundle)."""

    int8_dynamic: bool = True  # also torch.ao dynamic int8 of the Linear layers (compress.quantize)
    evaluate: bool = True  # score each on the eval split (the report's metric column)


@dataclass
class SourceStage:
    """Go back to the source run: the next run-to-run stage starts from it instead of from the last new model."""


@dataclass
class ExportStage:
    """The fp32 ONNX graphs, gated against PyTorch within these tolerances."""

    opset: int = DEFAULT_OPSET
    atol: float = 1.0e-4
    rtol: float = 1.0e-3
    evaluate: bool = True  # record the eval-split metrics (the metric gate of later int8 variants needs them)


@dataclass
class OptimizeStage:
    """The optimized variant: ONNX Runtime fusions, gated against PyTorch within these tolerances."""

    skip_fusions: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP_FUSIONS))  # see compress.optimize
    atol: float = 1.0e-4
    rtol: float = 1.0e-3


@dataclass
class CompressConfig:
    """A run directory, the stages to apply to it, and where the bundle and its report go."""

    run_dir: str = "runs/text_classification/default"
    out: str = "bundles/text_default"
    overwrite: bool = False  # replace an existing bundle at `out`
    # In order; each entry is one mapping `kind: {settings}` (kinds: STAGES). YAML: `- quantize: {method: static}`.
    stages: list[dict[str, Any]] = field(default_factory=lambda: [
        {"torch": {}}, {"export": {}}, {"optimize": {}}, {"quantize": {"name": "int8-dynamic"}}])
    # Keys of the run's recorded `data` config to replace for evaluation and calibration (an eval file that moved,
    # max_eval_samples, ...).
    data: dict[str, Any] = field(default_factory=dict)
    gate: GateConfig = field(default_factory=GateConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    # "fastest": the variant with the lowest p50 at the smallest batch size; "keep": export's choice; or a name.
    default_variant: str = "fastest"
    report: bool = True


@dataclass
class Lineage:
    """The model the stages work on: the source run, or the run a run-to-run stage wrote."""

    run: Run
    prefix: str = ""  # prefixes this model's variant names ("" for the source run)
    derived: dict[str, Any] | None = None  # the manifest's `derived` record of its variants
    exported: Exported | None = None
    task: TaskExport | None = None  # before an export: assets and eval data for the torch stage
    variants: dict[str, str] = field(default_factory=dict)  # "fp32" / "optimized" -> variant name in the bundle

    def name(self, base: str) -> str:
        return f"{self.prefix}-{base}" if self.prefix else base


class Pipeline:
    """The state the stages share: the current lineage, the bundle being built, the baselines and what was dropped."""

    def __init__(self, cfg: CompressConfig, bundle: Path, workdir: Path, trainer: Trainer | None = None):
        self.cfg, self.bundle, self.workdir, self.trainer = cfg, bundle, workdir, trainer
        self.lineage = Lineage(read_run(cfg.run_dir, data_overrides=cfg.data or None))
        self.first: Lineage | None = None  # the model exported first: it made the bundle and gives the latency inputs
        self.source = self.lineage
        self.baselines: dict[str, dict[str, Any]] = {}  # PyTorch rows: metrics, size, description
        self.runners: dict[str, Any] = {}  # PyTorch baselines to time with the variants
        self.rejected: dict[str, dict[str, Any]] = {}

    def task(self) -> TaskExport:
        """The current model's task: the export's, else one prepared in the work folder (for a torch stage first)."""
        lineage = self.lineage
        if lineage.exported is not None:
            return lineage.exported.task
        if lineage.task is None:
            folder = self.workdir / f"task-{lineage.prefix or 'source'}"
            folder.mkdir(exist_ok=True)
            parity = ParityConfig()
            lineage.task = prepare_task(lineage.run, load_model(lineage.run), folder,
                                        load_samples(lineage.run, limit=parity.num_samples), parity)
        return lineage.task

    def manifest(self) -> Manifest:
        return read_manifest(self.bundle, verify=False)


@dataclass(frozen=True)
class StageKind:
    """A stage: its typed settings, the function that applies it, and whether it makes a new model (run-to-run)."""

    config: type
    apply: Callable[[Pipeline, Any], None]
    new_model: bool = False


def run_pipeline(cfg: CompressConfig, *, trainer: Trainer | None = None) -> Manifest:
    """Apply the stages to the run, time every variant, choose the default, write the report; return the manifest.
    `trainer` runs the recipes that prune (with recovery) and distill stages train with (compress.training)."""
    stages = plan_stages(cfg.stages)
    out = bundle_destination(cfg.out, overwrite=cfg.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Quantization attempts and derived exports go to a work folder on the bundle's disk (graphs can be GBs).
    with staged(out) as bundle, tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
        pipeline = Pipeline(cfg, bundle, Path(work), trainer)
        for index, (kind, settings) in enumerate(stages):
            logger.info("stage %d/%d: %s", index + 1, len(stages), kind)
            STAGES[kind].apply(pipeline, settings)
        finish(pipeline)
    return read_manifest(out)


def plan_stages(entries: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Typed settings for every stage entry, checked before any work: one kind per entry, known kinds and keys, an
    export before the stages that need graphs, no two variants with one name."""
    plan, exported, names = [], False, set()
    unscored: str | None = None  # the export stage that set `evaluate: false` (quantize's metric gate needs it)
    source_state: tuple[bool, set[str], str | None] | None = None  # the source model's state once another came
    prefixes: list[str] = []  # one per run-to-run stage: a name used twice would overwrite the other's variants
    for i, entry in enumerate(entries):
        where = f"stages[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where} must name one stage, e.g. `- quantize: {{method: dynamic}}`; got {entry!r}")
        kind, options = next(iter(entry.items()))
        if kind not in STAGES:
            close = difflib.get_close_matches(kind, list(STAGES), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}: unknown stage {kind!r}; {hint}(stages: {', '.join(STAGES)})")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{where}.{kind}: settings must be a mapping such as {{key: value}}, got {options!r}")
        settings = config_from_dict(STAGES[kind].config, options or {}, prefix=f"{where}.{kind}.")
        if kind in ("optimize", "quantize") and not exported:
            raise ConfigError(f"{where}: a {kind} stage needs an export stage of the same model before it")
        if kind == "quantize" and unscored:
            raise ConfigError(f"{where}: a quantize stage gates on the eval metric of the fp32 graph, which "
                              f"{unscored} does not record (evaluate: false); remove that setting")
        if kind == "source":
            if source_state is None:
                raise ConfigError(f"{where}: a source stage goes back to the source run after a prune or distill "
                                  "stage; there is none before it")
            exported, names, unscored = source_state
            plan.append((kind, settings))
            continue
        if STAGES[kind].new_model:
            if kind in prefixes:
                raise ConfigError(f"{where}: a second {kind} stage would overwrite the first one's run and variants; "
                                  "use one per config")
            prefixes.append(kind)
            source_state = source_state or (exported, names, unscored)
            names, unscored = set(), None
        exported = (exported or kind == "export") and not STAGES[kind].new_model
        if kind == "export":
            unscored = None if settings.evaluate else f"{where}.export"
        name = settings.name if kind == "quantize" else None
        if name is not None:
            if name in names:
                raise ConfigError(f"{where}: two quantize stages are named {name!r}; give each its own `name`")
            names.add(name)
        plan.append((kind, settings))
    return plan


# --- the stages ----------------------------------------------------------------------------------------------------

def torch_stage(p: Pipeline, cfg: TorchStage) -> None:
    """fp32 eager (transformers' default attention) and optionally dynamic int8, scored and kept for timing."""
    import torch

    task, lineage = p.task(), p.lineage
    model = load_model(lineage.run, attn_implementation=None)
    models = {lineage.name("torch-fp32"): (model, "PyTorch fp32 eager", _weights_bytes(lineage.run))}
    if cfg.int8_dynamic:
        quantized = quantize_torch_dynamic(model)
        buffer = io.BytesIO()
        torch.save(quantized.state_dict(), buffer)  # its own freshly made weights, for their size
        models[lineage.name("torch-int8-dynamic")] = (quantized, "PyTorch dynamic int8 (torch.ao, nn.Linear)",
                                                      buffer.tell())
    for name, (module, description, size) in models.items():
        metrics = task.evaluate_with(_torch_predict(module, task.input_names)) if cfg.evaluate else None
        p.baselines[name] = {"runtime": "PyTorch", "description": description, "metrics": metrics,
                             "size_bytes": size, "derived": lineage.derived}
        p.runners[name] = torch_runner(module, task.input_names)


def export_stage(p: Pipeline, cfg: ExportStage) -> None:
    """The fp32 graphs: the bundle itself for the source run, variants added to it for a derived run."""
    lineage = p.lineage
    config = ExportConfig(opset=cfg.opset, parity=ParityConfig(atol=cfg.atol, rtol=cfg.rtol), evaluate=cfg.evaluate)
    if p.first is None:
        lineage.exported = export_run(lineage.run, p.bundle, config=config, overwrite=True)
        lineage.prefix = ""  # the bundle's first model: its variants need no prefix
        lineage.variants["fp32"] = "fp32"
        p.first = lineage
        return
    lineage.exported = export_run(lineage.run, p.workdir / f"export-{lineage.prefix}", config=config)
    own = lineage.exported.manifest
    bundle = p.manifest()
    if own.data.get("files", {}).get("tokenizer.json") != bundle.data["files"].get("tokenizer.json") or \
            own.data.get("preprocessing") != bundle.data.get("preprocessing"):
        raise ExportError(f"the {lineage.prefix} model's inputs (tokenizer or preprocessing) differ from the bundle's; "
                          "export it to its own bundle")
    fp32 = own.variants["fp32"]
    name = lineage.name("fp32")
    add_variant(p.bundle, name, {role: own.graph_path("fp32", role) for role in fp32["graphs"]}, VariantRecord(
        parent=None, parity=fp32["parity"], metrics=fp32["metrics"], derived=lineage.derived, session=fp32["session"]))
    lineage.variants["fp32"] = name


def optimize_stage(p: Pipeline, cfg: OptimizeStage) -> None:
    lineage = p.lineage
    exported = _exported(lineage, "optimize")
    name = lineage.name("optimized")
    files, optimization, parity = optimize_variant(
        exported.task, exported.graphs, p.workdir, name, parity=ParityConfig(atol=cfg.atol, rtol=cfg.rtol),
        skip_fusions=tuple(cfg.skip_fusions))
    add_variant(p.bundle, name, files, VariantRecord(
        parent=lineage.variants["fp32"], parity=parity, optimization=optimization,
        metrics=exported.task.evaluate(files["model"]), derived=lineage.derived,
        session=session_settings(cfg.skip_fusions)))
    lineage.variants["optimized"] = name


def quantize_stage(p: Pipeline, cfg: QuantizeConfig) -> None:
    """An int8 variant behind the gates (compress.quantize); dropped with its reason when no rung passes."""
    lineage = p.lineage
    exported = _exported(lineage, "quantize")
    manifest = p.manifest()
    sources = {base: {role: manifest.graph_path(name, role) for role in manifest.variants[name]["graphs"]}
               for base, name in lineage.variants.items()}
    fp32 = manifest.variants[lineage.variants["fp32"]]
    outcome = quantize_gated(exported.task, sources, fp32["metrics"], cfg, p.cfg.gate, p.workdir)
    name = lineage.name(cfg.name)
    twin = None if outcome.files is None else same_quantization(manifest, outcome.quantization, lineage.derived)
    if outcome.files is None or twin:
        reason = outcome.reason or (f"it passed only as rung '{outcome.quantization['ladder'][-1]['rung']}', "
                                    f"which makes the same graph as variant {twin}: not written twice")
        p.rejected[name] = {"stage": "quantize", "reason": reason, "attempts": outcome.quantization["ladder"],
                            "skipped_rungs": outcome.quantization["skipped_rungs"], "derived": lineage.derived}
        for path in (outcome.files or {}).values():
            path.unlink()
        return
    parent = lineage.variants[outcome.quantization["source"]]
    add_variant(p.bundle, name, outcome.files, VariantRecord(
        parent=parent, parity=outcome.parity, metrics=outcome.metrics, quantization=outcome.quantization,
        metric_gate=outcome.metric_gate, derived=lineage.derived, session=manifest.variants[parent]["session"]))
    for path in outcome.files.values():
        path.unlink()


QUANTIZATION_KEYS = ("source", "method", "format", "weight_type", "per_channel", "reduce_range", "exclude_op_types",
                     "calibration")


def same_quantization(manifest: Manifest, quantization: dict[str, Any], derived: dict[str, Any] | None) -> str | None:
    """The variant of the same model already quantized with these settings, if any: e.g. a static stage whose last
    rung (dynamic instead of static) lands on what the dynamic stage already wrote."""
    key = [quantization.get(k) for k in QUANTIZATION_KEYS]
    return next((name for name, variant in manifest.variants.items() if variant.get("quantization")
                 and variant.get("derived") == derived
                 and [variant["quantization"].get(k) for k in QUANTIZATION_KEYS] == key), None)


def transform_stage(fn: Callable[..., Any], prefix: str) -> Callable[[Pipeline, Any], None]:
    """A run-to-run stage from `fn(run_dir, out_dir, *, config, overwrite, trainer)` (which writes a new run
    directory at out_dir, e.g. compress.prune.prune_run): the stages after it work on the new run, its variants named
    `<prefix>-...`. New runs are kept next to the bundle, in `<out>-runs/<prefix>` (replaced only with overwrite)."""

    def apply(p: Pipeline, config: Any) -> None:
        bundle = Path(p.cfg.out)
        out = bundle.with_name(f"{bundle.name}-runs") / prefix
        out.parent.mkdir(parents=True, exist_ok=True)
        written = fn(p.lineage.run.run_dir, out, config=config, overwrite=p.cfg.overwrite, trainer=p.trainer)
        run = read_run(written or out, data_overrides=p.cfg.data or None)
        # Paths relative to the bundle: the manifest never records the builder's absolute paths.
        derived = {"stage": prefix, "from": p.lineage.derived["run"] if p.lineage.derived else relative_path(
            p.source.run.run_dir, bundle), "run": relative_path(run.run_dir, bundle),
            "settings": config_to_dict(config)}
        p.lineage = Lineage(run, prefix=f"{p.lineage.prefix}-{prefix}" if p.lineage.prefix else prefix,
                            derived=derived)

    return apply


def source_stage(p: Pipeline, cfg: SourceStage) -> None:
    """The stages after this one work on the source run again (e.g. distill it after pruning it)."""
    p.lineage = p.source


STAGES: dict[str, StageKind] = {
    "torch": StageKind(TorchStage, torch_stage),
    "export": StageKind(ExportStage, export_stage),
    "optimize": StageKind(OptimizeStage, optimize_stage),
    "quantize": StageKind(QuantizeConfig, quantize_stage),
    "source": StageKind(SourceStage, source_stage),
    "prune": StageKind(PruneConfig, transform_stage(prune_run, "pruned"), new_model=True),
    "distill": StageKind(DistillConfig, transform_stage(distill_run, "distilled"), new_model=True),
}


# --- after the stages ----------------------------------------------------------------------------------------------

def portable(value: Any, bundle: Path) -> Any:
    """`value` (a config as a dict) with every absolute path made relative to the bundle: what a manifest records, so
    it carries no path of the machine that built it."""
    if isinstance(value, dict):
        return {k: portable(v, bundle) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, bundle) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return relative_path(Path(value), bundle)
    return value


def finish(p: Pipeline) -> None:
    """Time every variant and baseline on the same inputs, record it, choose the default variant, write the report."""
    from compress.report import write_report

    if p.first is None or p.first.exported is None:
        raise ConfigError("the stages wrote no bundle: add an export stage")
    cfg, task = p.cfg, p.first.exported.task
    manifest = p.manifest()
    inputs, described = {}, {}
    for size in cfg.latency.batch_sizes:
        inputs[size], described[f"batch_{size}"] = task.latency_inputs(size)
    runners = {name: ort_runner(manifest.graph_path(name), threads=cfg.latency.threads, session=variant["session"])
               for name, variant in manifest.variants.items()}
    timed = measure({**p.runners, **runners}, inputs, cfg.latency)
    metric, higher = cfg.gate.resolve_metric(task.primary_metric)
    for name in p.baselines:
        p.baselines[name]["latency"] = timed[name]
    default = _default_variant(cfg.default_variant, manifest, timed, min(cfg.latency.batch_sizes))

    def record(data: dict[str, Any]) -> None:
        for name, variant in data["variants"].items():
            variant["latency"] = timed[name]
        data["default_variant"] = default
        if p.rejected:
            data["rejected"] = p.rejected
        data["compress"] = {"config": portable(config_to_dict(cfg), Path(cfg.out)),
                            "metric": {"name": metric, "higher_is_better": higher},
                            "latency": {"settings": dataclasses.asdict(cfg.latency), "inputs": described,
                                        "timer": "time.perf_counter around one call, after warm-up"},
                            "baselines": p.baselines}

    edit_manifest(p.bundle, record)
    if cfg.report:
        write_report(p.bundle, title=Path(cfg.out).name)


def _default_variant(wanted: str, manifest: Manifest, timed: dict[str, Any], batch: int) -> str:
    if wanted == "keep":
        return manifest.default_variant
    if wanted == "fastest":
        return min(manifest.variants, key=lambda name: timed[name][f"batch_{batch}"]["p50_ms"])
    if wanted not in manifest.variants:
        raise ConfigError(f"default_variant {wanted!r} is not a variant of the bundle "
                          f"(variants: {', '.join(manifest.variants)}); use fastest, keep or one of those")
    return wanted


def _exported(lineage: Lineage, stage: str) -> Exported:
    if lineage.exported is None:
        raise ConfigError(f"a {stage} stage needs an export stage of the same model before it")
    return lineage.exported


def _torch_predict(model: Any, input_names: list[str]) -> Callable[[dict[str, Any]], Any]:
    import torch

    def predict(feeds: dict[str, Any]) -> Any:
        with torch.inference_mode():
            out = model(**{n: torch.from_numpy(feeds[n]) for n in input_names})
        return out.logits.float().numpy()

    return predict


def _weights_bytes(run: Run) -> int:
    """Bytes of the run's saved weights (model/*.safetensors): the PyTorch model's file size."""
    return sum(p.stat().st_size for p in run.model_dir.glob("*.safetensors"))

