"""The trade-off report of a bundle: report.md, report.json and tradeoff.png, written from its manifest alone.

One row per variant and PyTorch baseline: the task metric on the eval split and its change against PyTorch fp32, the
file size, p50 / p95 latency at each measured batch size, the speedup against PyTorch fp32, and the gate verdict;
then the variants a gate dropped, with the reason and every rung of the quantization ladder. Every number is read
from manifest.json (which `python -m compress run` writes first), so the report and the manifest cannot disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from compress.bundle import edit_manifest
from serve.bundle.manifest import read_manifest

REPORT_MD, REPORT_JSON, REPORT_PLOT = "report.md", "report.json", "tradeoff.png"
BASELINE = "torch-fp32"


def report_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's rows from manifest data: baselines, variants, then dropped variants (no file, no timings)."""
    compress = data["compress"]
    metric = compress["metric"]["name"]
    sizes = compress["latency"]["settings"]["batch_sizes"]
    rows = []
    for name, base in compress["baselines"].items():
        rows.append(_row(name, "PyTorch", base["description"], base["metrics"], base["size_bytes"], base["latency"],
                         "baseline", None, metric))
    for name, variant in data["variants"].items():
        gate = variant.get("metric_gate")
        verdict = "passed: " + ("metric + numeric" if gate else "parity vs PyTorch")
        rows.append(_row(name, "ONNX Runtime", _describe(variant), variant["metrics"], variant["size_bytes"],
                         variant["latency"], verdict, None, metric, file=variant["graphs"]["model"]["file"]))
    for name, dropped in (data.get("rejected") or {}).items():
        rows.append(_row(name, "ONNX Runtime", f"{dropped['stage']} ({len(dropped['attempts'])} attempts)", None, None,
                         None, "dropped", dropped["reason"], metric))
    reference = next((r for r in rows if r["name"] == BASELINE), None) or next(
        (r for r in rows if r["name"] == "fp32"), None)
    higher = compress["metric"]["higher_is_better"]
    for row in rows:
        row["reference"] = reference["name"] if reference else None
        row["delta"] = None if row["metric"] is None or reference is None or reference["metric"] is None else \
            row["metric"] - reference["metric"]
        row["better_is"] = "higher" if higher else "lower"
        row["speedup"] = {}
        for size in sizes:
            key = f"batch_{size}"
            mine, ref = (row["latency"] or {}).get(key), (reference["latency"] or {}).get(key) if reference else None
            row["speedup"][key] = ref["p50_ms"] / mine["p50_ms"] if mine and ref else None
    return rows


def write_report(bundle_dir: str | Path, *, title: str | None = None) -> dict[str, Any]:
    """Write report.md, report.json and tradeoff.png into the bundle and list them (hashed) in the manifest; `title`
    names the bundle (default: its folder's name)."""
    root = Path(bundle_dir)
    data = read_manifest(root, verify=False).data
    rows = report_rows(data)
    compress = data["compress"]
    cpu = next(iter(data["variants"].values()))["environment"]
    report = {"bundle": title or root.name, "task": data["task"], "source_run": data["source_run"]["path"],
              "metric": compress["metric"], "default_variant": data["default_variant"],
              "latency": compress["latency"], "environment": cpu, "rows": rows}
    (root / REPORT_JSON).write_text(json.dumps(report, indent=2, default=float) + "\n")
    (root / REPORT_MD).write_text(markdown(report))
    plot_tradeoff(rows, compress["metric"]["name"], root / REPORT_PLOT)

    def record(manifest: dict[str, Any]) -> None:
        manifest["report"] = {"markdown": REPORT_MD, "json": REPORT_JSON, "plot": REPORT_PLOT}

    edit_manifest(root, record, hash_files=(REPORT_MD, REPORT_JSON, REPORT_PLOT))
    return report


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was measured and how, the table, the dropped variants and how to read it."""
    metric = report["metric"]["name"]
    latency = report["latency"]
    settings = latency["settings"]
    sizes = settings["batch_sizes"]
    env = report["environment"]
    flags = ", ".join(name for name, on in env["cpu"]["flags"].items() if on) or "none of note"
    percent = _is_fraction(metric)
    lines = [
        f"# Compression report: {report['bundle']}", "",
        f"Task {report['task']}, source run `{report['source_run']}`.",
        f"Default variant: **{report['default_variant']}**.", "",
        f"- Metric: {metric} on the eval split ({'higher' if report['metric']['higher_is_better'] else 'lower'} is "
        f"better); delta and speedup against {report['rows'][0]['reference']}.",
        f"- Latency: {settings['runs']} timed calls per variant and batch size after {settings['warmup']} warm-up "
        f"calls, interleaved across variants in {settings['rounds']} rounds; {settings['threads']} intra-op "
        "thread(s) in every runtime; ONNX Runtime sessions use each variant's recorded session settings.",
        *(f"- Inputs, batch {s}: {latency['inputs'][f'batch_{s}']}" for s in sizes),
        f"- Machine: {env['cpu']['model']} ({env['cpu']['logical_cores']} logical cores; {flags}), "
        f"onnxruntime {env['libraries'].get('onnxruntime')}, torch {env['libraries'].get('torch')}. Times on a busy "
        "machine are inflated; compare rows by their ratios.", "",
    ]
    cpu = settings["threads"] == 1
    head = ["variant", "runtime", metric, "delta", "size MB"]
    for s in sizes:
        head += [f"p50 b{s} ms", f"p95 b{s} ms"] + ([f"cpu b{s} ms"] if cpu else [])
    head += [f"speedup b{s}" for s in sizes] + ["gate"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [f"**{row['name']}**" if row["name"] == report["default_variant"] else row["name"], row["runtime"],
                 _num(row["metric"], percent), _delta(row["delta"], percent),
                 f"{row['size_bytes'] / 1e6:.1f}" if row["size_bytes"] else "-"]
        for s in sizes:
            timing = (row["latency"] or {}).get(f"batch_{s}")
            cells += [f"{timing['p50_ms']:.2f}", f"{timing['p95_ms']:.2f}"] if timing else ["-", "-"]
            if cpu:
                cells.append(f"{timing['cpu_p50_ms']:.2f}" if timing else "-")
        cells += [f"{row['speedup'][f'batch_{s}']:.2f}x" if row["speedup"][f"batch_{s}"] else "-" for s in sizes]
        cells.append(row["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Variants", "", *(f"- {r['name']}: {r['description']}" for r in report["rows"]), ""]
    dropped = [r for r in report["rows"] if r["verdict"] == "dropped"]
    if dropped:
        lines += ["## Dropped", ""] + [f"- **{r['name']}**: {r['reason']}" for r in dropped] + [""]
    lines += [
        "## How to read this", "",
        f"- `delta` is the change of {metric} against the reference row"
        + (" in points (percentage points)." if percent else "."),
        "- `speedup` is the reference's p50 divided by the row's p50 at that batch size (above 1: faster).",
        "- `cpu` (one thread only) is the p50 of the calling thread's CPU time per call: on a shared machine it leaves "
        "out the time spent waiting for the CPU, which wall-clock p50 / p95 include.",
        "- A variant is in the bundle only if it passed its gates: parity with PyTorch for fp32 / optimized graphs; "
        "for int8, a numeric check against the fp32 graph and the task-metric gate (at most the configured relative "
        "drop of the fp32 graph's metric). `dropped` rows failed every rung of the quantization ladder; manifest.json "
        "keeps each attempt under `rejected`.",
        "- Size is the variant's ONNX file(s); for PyTorch, the saved safetensors (fp32) or the serialized int8 "
        "state dict.",
        f"- tradeoff.png plots {metric} against p50 latency at batch {sizes[0]}; point area follows file size.", "",
    ]
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Metric against p50 latency at the smallest batch size, one point per measured row, area ~ file size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    measured = [r for r in rows if r["latency"] and r["metric"] is not None]
    key = min((k for r in measured for k in r["latency"]), key=lambda k: int(k.split("_")[1]), default="batch_1")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    largest = max((r["size_bytes"] or 1 for r in measured), default=1)
    for i, row in enumerate(sorted(measured, key=lambda r: r["latency"][key]["p50_ms"])):
        x, y = row["latency"][key]["p50_ms"], row["metric"]
        color = "tab:orange" if row["runtime"] == "PyTorch" else "tab:blue"
        ax.scatter([x], [y], s=40 + 960 * math.sqrt((row["size_bytes"] or 0) / largest), alpha=0.6, color=color,
                   edgecolors="black", linewidths=0.5)
        # Labels step up and down in turn: variants of equal quality sit on one line.
        ax.annotate(f"{row['name']} ({(row['size_bytes'] or 0) / 1e6:.1f} MB)", (x, y), textcoords="offset points",
                    xytext=(4, 14 * (i % 4) - 21), fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.4})
    ax.set_xlabel(f"p50 latency at {key.replace('_', ' ')} (ms, log scale)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel(f"{metric} (eval split)")
    ax.set_title("Quality vs latency (orange: PyTorch, blue: ONNX Runtime; area ~ file size)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row(name: str, runtime: str, description: str, metrics: dict[str, Any] | None, size: int | None,
         latency: dict[str, Any] | None, verdict: str, reason: str | None, metric: str, *,
         file: str | None = None) -> dict[str, Any]:
    value = (metrics or {}).get(metric)
    return {"name": name, "runtime": runtime, "description": description, "file": file, "size_bytes": size,
            "metric": float(value) if value is not None else None, "latency": latency, "verdict": verdict,
            "reason": reason}


def _describe(variant: dict[str, Any]) -> str:
    """One phrase on how a variant was made."""
    quant, opt = variant.get("quantization"), variant.get("optimization")
    derived = variant.get("derived")
    prefix = f"{derived['stage']} model, " if derived else ""
    if quant:
        channel = "per-channel" if quant["per_channel"] else "per-tensor"
        extra = (f", {quant['calibration']['method']} calibration on {quant['calibration']['samples']}"
                 if quant["calibration"] else "")
        excluded = f", fp32 kept for {'/'.join(quant['exclude_op_types'])}" if quant["exclude_op_types"] else ""
        tries = len(quant["ladder"])
        return (f"{prefix}int8 {quant['method']} ({quant['format']}) of {quant['source']}, {channel}"
                f"{', 7-bit' if quant['reduce_range'] else ''}{excluded}{extra}; attempt {tries} of the ladder")
    if opt:
        return f"{prefix}{opt['method']}"
    return f"{prefix}fp32 export ({variant['exporter']}, opset {variant['opset']})"


def _is_fraction(metric: str) -> bool:
    return metric in ("accuracy", "f1", "precision", "recall", "roc_auc")


def _num(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if percent else f"{value:.4g}"


def _delta(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f} pt" if percent else f"{value:+.4g}"
