"""Write bundles: export a run directory to a folder of parity-gated ONNX graphs + assets + manifest.json.

`export_bundle` builds the whole bundle in a temp folder next to the target and renames it into place only after
every gate passed; `add_variant` adds a variant (e.g. a quantized graph gated by phase-2 code) to an existing bundle
and commits it by replacing manifest.json. The format itself is described in serve.bundle.manifest.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.export import DEFAULT_OPSET, EXPORTER, Graph, describe_graph
from compress.optimize import DEFAULT_SKIP_FUSIONS, optimization_settings, optimize_graph, session_settings
from compress.parity import ParityConfig, check_generation, check_graph, open_session
from compress.source import Run, load_model, load_samples, read_run
from compress.tasks import TaskExport, prepare_task
from serve.bundle.folders import FolderGuard, relative_path, remove_temp, replace_file, replace_folder
from serve.bundle.manifest import (
    MANIFEST,
    BundleError,
    Manifest,
    environment,
    new_manifest,
    read_manifest,
    sha256_file,
    utc_now,
    write_manifest,
)
from serve.bundle.records import VariantRecord

logger = logging.getLogger(__name__)

GRAPH_SUFFIX = {"model": ".onnx", "decoder": ".decoder.onnx"}


@dataclass
class ExportConfig:
    """What `export_bundle` writes and how strictly it checks it."""

    opset: int = DEFAULT_OPSET
    optimize: bool = False  # add the "optimized" variant (ONNX Runtime fusions), itself parity-gated
    parity: ParityConfig = field(default_factory=ParityConfig)
    optimized_parity: ParityConfig | None = None  # tolerances for the optimized variant; None: same as `parity`
    evaluate: bool = True  # record each variant's metrics on the eval split (where the run recorded its data)
    # Fusions left out of the optimized graph and disabled at session load (compress.optimize.SLOW_FUSIONS).
    skip_fusions: tuple[str, ...] = DEFAULT_SKIP_FUSIONS


@dataclass
class Exported:
    """A bundle just written, with what made it: the task (assets, parity cases, eval-split scoring) and the fp32
    graphs with their PyTorch references, so later stages can add variants gated the same way."""

    manifest: Manifest
    task: TaskExport
    graphs: list[Graph]  # paths inside the bundle


def export_bundle(run_dir: str | Path, out: str | Path, *, config: ExportConfig | None = None,
                  samples: list[Any] | None = None, overwrite: bool = False,
                  data_overrides: dict[str, Any] | None = None) -> Manifest:
    """Export a run directory to a new bundle at `out`: the fp32 graphs (and the optimized ones) that passed their
    parity gates, the tokenizer or preprocessing spec, and manifest.json. A failing gate raises; nothing is written.

    `samples` (texts, (text, pair) tuples, or images/paths) replace the run's eval split as parity inputs;
    `data_overrides` replace keys of the run's recorded `data` config (e.g. an eval file that moved).
    """
    run = read_run(run_dir, data_overrides=data_overrides)
    return export_run(run, out, config=config, samples=samples, overwrite=overwrite).manifest


def export_run(run: Run, out: str | Path, *, config: ExportConfig | None = None, samples: list[Any] | None = None,
               overwrite: bool = False) -> Exported:
    """`export_bundle` for a run already read, returning the task and graphs along with the manifest."""
    config = config or ExportConfig()
    out = bundle_destination(out, overwrite=overwrite)
    model = load_model(run)
    picked = load_samples(run, limit=config.parity.num_samples, given=samples)
    session = session_settings(config.skip_fusions)
    with staged(out) as stage:
        task = prepare_task(run, model, stage, picked, config.parity)
        # The run's path relative to the bundle (never the builder's absolute path): the demo finds it from there.
        data = new_manifest(run.task, source_run={**task.source_run, "path": relative_path(run.run_dir, out)},
                            **task.sections)
        fp32 = task.export(stage, "fp32", opset=config.opset)
        parity = gate_graphs(fp32, {g.role: g.path for g in fp32}, task, config.parity, "fp32")
        _add_variant(stage, data, "fp32", {g.role: g.path for g in fp32}, VariantRecord(
            parent=None, parity=parity, metrics=task.evaluate(fp32[0].path) if config.evaluate else None,
            session=session))
        if config.optimize:
            files, optimization, parity = optimize_variant(task, fp32, stage, "optimized",
                                                           parity=config.optimized_parity or config.parity,
                                                           skip_fusions=config.skip_fusions)
            _add_variant(stage, data, "optimized", files, VariantRecord(
                parent="fp32", parity=parity, optimization=optimization,
                metrics=task.evaluate(files["model"]) if config.evaluate else None, session=session))
        data["default_variant"] = "optimized" if config.optimize else "fp32"
        _finish(stage, data)
    for graph in fp32:
        graph.path = out / graph.path.name
    logger.info("wrote bundle %s (variants: %s)", out, ", ".join(data["variants"]))
    # Hashed as written; verifying 1 GB of graphs again costs seconds.
    return Exported(read_manifest(out, verify=False), task, fp32)


def optimize_variant(task: TaskExport, graphs: list[Graph], folder: Path, name: str, *, parity: ParityConfig,
                     skip_fusions: tuple[str, ...] = DEFAULT_SKIP_FUSIONS,
                     ) -> tuple[dict[str, Path], dict[str, Any], dict[str, Any]]:
    """Write the optimized graph of each fp32 graph into `folder` as `name`, gate it against PyTorch; return the
    files ({role: path}), the manifest's optimization record and the parity record (or raise ParityError)."""
    files, optimization = {}, optimization_settings(task.fusion_args["model_type"], skip_fusions)
    for graph in graphs:
        files[graph.role] = folder / f"{name}{GRAPH_SUFFIX[graph.role]}"
        optimization["graphs"][graph.role] = optimize_graph(graph.path, files[graph.role], skip_fusions=skip_fusions,
                                                            **task.fusion_args)
    return files, optimization, gate_graphs(graphs, files, task, parity, name)


def add_variant(bundle_dir: str | Path, name: str, graphs: dict[str, str | Path], record: VariantRecord, *,
                default: bool = False) -> Manifest:
    """Copy graph files ({"model": path[, "decoder": path]}) that passed their gate into a bundle as variant `name`.

    The caller gates first and passes the verdict in `record` (parity, and/or metrics with the metric gate's). The
    files land under new names; replacing manifest.json is the commit point, so a crash leaves the old bundle valid
    (stray files are not in the manifest and are overwritten by the next add).
    """
    root = Path(bundle_dir)
    data = read_manifest(root).data
    if name in data["variants"]:
        raise BundleError(f"bundle {root} already has a variant {name!r}; pick another name")
    expected = set(next(iter(data["variants"].values()))["graphs"])
    if set(graphs) != expected:
        raise BundleError(f"variant {name!r} must provide the graphs {sorted(expected)}, got {sorted(graphs)}")
    placed = {}
    for role, src in graphs.items():
        dst = root / f"{name}{GRAPH_SUFFIX[role]}"
        tmp = root / f".tmp-{uuid.uuid4().hex[:8]}-{dst.name}"
        shutil.copyfile(src, tmp)
        replace_file(tmp, dst)
        placed[role] = dst
    _add_variant(root, data, name, placed, record)
    if default:
        data["default_variant"] = name
    write_manifest(root, data)
    return read_manifest(root)


def edit_manifest(bundle_dir: str | Path, edit: Callable[[dict[str, Any]], None], *,
                  hash_files: tuple[str, ...] = ()) -> Manifest:
    """Apply `edit` to a bundle's manifest data and commit it in one rename; `hash_files` (paths relative to the
    bundle, e.g. the report) are hashed into `files` first. For bundle-level records: default variant, rejected
    variants, latency, report."""
    root = Path(bundle_dir)
    data = read_manifest(root, verify=False).data
    edit(data)
    for rel in hash_files:
        data["files"][rel] = sha256_file(root / rel)
    write_manifest(root, data)
    return read_manifest(root, verify=False)


def gate_graphs(reference: list[Graph], files: dict[str, Path], task: TaskExport, config: ParityConfig,
          variant: str) -> dict[str, Any]:
    """Parity of each graph file ({role: path}) against the PyTorch module it came from (+ greedy generation for
    decoders); the variant's `parity` record, or ParityError. Derived variants are gated against PyTorch, not fp32."""
    records: dict[str, Any] = {}
    for graph in reference:
        label = f"{variant} {graph.role} graph ({files[graph.role].name})"
        session = open_session(files[graph.role])
        records[graph.role] = check_graph(session, graph.reference, task.cases[graph.role], config=config, label=label)
        if graph.role == "decoder":
            records["generation"] = check_generation(session, task.model, task.prompts, cache=task.sections["cache"],
                                                     config=config, label=label, **task.generation_ids)
    graphs = [records[g.role] for g in reference]
    top1 = [r["top1_agreement"] for r in graphs if r["top1_agreement"] is not None]
    return {"passed": True, "inputs": task.samples_source, "atol": config.atol, "rtol": config.rtol,
            "min_top1_agreement": config.min_top1_agreement,
            "max_abs_diff": max(r["max_abs_diff"] for r in graphs),
            "max_rel_diff": max(r["max_rel_diff"] for r in graphs),
            "top1_agreement": min(top1) if top1 else None, "graphs": records}


def _add_variant(root: Path, data: dict[str, Any], name: str, files: dict[str, Path], record: VariantRecord) -> None:
    """Record a variant whose files already sit in `root` under their final names."""
    graphs, opset, zeros, weights = {}, None, 0, 0
    for role, path in files.items():
        described = describe_graph(path)
        opset = described["opset"]
        zeros, weights = zeros + described["weight_zeros"], weights + described["weight_count"]
        graphs[role] = {"file": path.name, "inputs": described["inputs"], "outputs": described["outputs"]}
        data["files"][path.name] = sha256_file(path)
    import torch

    data["variants"][name] = {
        "graphs": graphs, "created": utc_now(), "parent": record.parent, "opset": opset, "exporter": EXPORTER,
        "exporter_version": torch.__version__, "optimization": record.optimization,
        "quantization": record.quantization, "pruning": record.pruning, "derived": record.derived,
        "sparsity": zeros / weights if weights else 0.0, "parity": record.parity, "metrics": record.metrics,
        "metric_gate": record.metric_gate, "session": record.session or session_settings(), "latency": None,
        "size_bytes": sum(p.stat().st_size for p in files.values()), "environment": environment(),
    }


def _finish(stage: Path, data: dict[str, Any]) -> None:
    """Hash the assets, write the manifest, and read the staged bundle back as a reader would."""
    for path in sorted(stage.iterdir()):
        if path.is_file() and path.name != MANIFEST and path.name not in data["files"]:
            data["files"][path.name] = sha256_file(path)
    write_manifest(stage, data)
    read_manifest(stage, verify=False)  # the structure a reader checks (the files were hashed just now)


def bundle_destination(out: str | Path, *, overwrite: bool) -> Path:
    """The absolute folder a bundle will be written to, checked first: a folder that holds files is replaced only
    with `overwrite`, and only if it is a bundle (never a run directory, a project, or the folder we run in)."""
    out = Path(out).expanduser().resolve()
    if not out.exists() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise BundleError(f"{out} already exists and is not empty; choose another out, or set overwrite "
                          "(--overwrite, overwrite=true) to replace the bundle there")
    BUNDLE_GUARD.check(out)
    return out


def bundle_entries(path: Path) -> set[str] | None:
    """The top-level entries a bundle writes (its manifest and the files it lists), or None when `path` holds no
    readable tuneforge manifest."""
    try:
        data = read_manifest(path, verify=False).data
    except BundleError:
        return None
    return {MANIFEST, *(Path(name).parts[0] for name in data["files"]), *(data.get("report") or {}).values()}


BUNDLE_GUARD = FolderGuard("tuneforge bundle", bundle_entries, "overwrite", "out", BundleError,
                           f" (no readable {MANIFEST})")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temp folder next to `out` that replaces `out` (see `replace_folder`) only if the block finishes; removed
    on any error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        replace_folder(stage, out, BUNDLE_GUARD)
    except BaseException:
        remove_temp(stage)
        raise
