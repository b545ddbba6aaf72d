"""Command line for compress.

    python -m compress export RUN_DIR --out BUNDLE [--optimize] [--opset 17] [--samples FILE] [--overwrite]
    python -m compress run --config recipes/configs/compress/text_default.yaml [key.sub=value ...]
    python -m compress verify BUNDLE [--expect sha256:...]   # check the manifest and every file; print the digest

`run` applies a config's stages (torch baselines, export, optimize, quantize) to a run directory and writes the
bundle with report.md / report.json / tradeoff.png; see compress/pipeline.py. `--help-config` lists its keys.

`verify` prints the bundle's digest (sha256 over manifest.json and every file; serve.bundle.manifest.bundle_digest);
`--expect DIGEST` fails unless the bundle is exactly the one pinned by that digest.

`--samples FILE`: parity inputs instead of the run's eval split: a text file with one text per line, or a folder of
images. A parity failure prints the worst outputs and exits with status 2; no bundle is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from finetune.errors import exit_on_user_error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m compress", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export a run directory to a parity-gated ONNX bundle")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, required=True, help="the bundle folder to create")
    export.add_argument("--optimize", action="store_true", help="add the ONNX Runtime optimized variant")
    export.add_argument("--opset", type=int, default=None)
    export.add_argument("--samples", type=Path, default=None, help="text file (one per line) or image folder")
    export.add_argument("--no-evaluate", action="store_true", help="skip the eval-split metrics of each variant")
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    run = commands.add_parser("run", help="apply a config's stages to a run directory: bundle + trade-off report")
    run.add_argument("--config", type=Path, default=None, help="a YAML of recipes/configs/compress/")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    run.add_argument("--help-config", action="store_true", help="list every config key with its default")
    run.add_argument("--recipes", type=Path, default=Path("recipes"),
                     help="the recipes folder that prune (recovery) and distill stages train with (default: recipes)")
    verify = commands.add_parser("verify", help="check a bundle's manifest and files")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--expect", default=None, metavar="DIGEST",
                        help="fail unless the bundle's digest is this one (as printed by an earlier verify)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with exit_on_user_error():
        if args.command == "run":
            _run(args)
            return
        if args.command == "verify":
            from serve.bundle.manifest import bundle_digest, check_digest, read_manifest

            # Every file is hashed once: the digest checks each against its sha256 in the manifest.
            digest = check_digest(args.bundle, args.expect) if args.expect else bundle_digest(args.bundle)
            manifest = read_manifest(args.bundle, verify=False)
            summary = {name: {"files": [g["file"] for g in v["graphs"].values()], "size_bytes": v.get("size_bytes"),
                              "max_abs_diff": (v.get("parity") or {}).get("max_abs_diff")}
                       for name, v in manifest.variants.items()}
            sys.stdout.write(json.dumps({"bundle": str(args.bundle), "task": manifest.task, "ok": True,
                                         "digest": digest, "variants": summary}, indent=2) + "\n")
            return
        from compress.bundle import ExportConfig, export_bundle

        config = ExportConfig(optimize=args.optimize, evaluate=not args.no_evaluate)
        if args.opset is not None:
            config.opset = args.opset
        manifest = export_bundle(args.run_dir, args.out, config=config, samples=_read_samples(args.samples),
                                 overwrite=args.overwrite)
        for name, variant in manifest.variants.items():
            parity = variant["parity"]
            sys.stdout.write(f"{name}: {', '.join(g['file'] for g in variant['graphs'].values())}, "
                             f"{variant['size_bytes'] / 1e6:.1f} MB, max abs diff {parity['max_abs_diff']:.2g}\n")
        sys.stdout.write(f"wrote {args.out}\n")


def _run(args: argparse.Namespace) -> None:
    from compress.pipeline import CompressConfig, run_pipeline
    from compress.training import ScriptTrainer
    from finetune.config import format_config_help, load_config

    if args.help_config:
        sys.stdout.write(format_config_help(CompressConfig))
        return
    manifest = run_pipeline(load_config(CompressConfig, args.config, args.overrides),
                            trainer=ScriptTrainer(args.recipes))
    report = manifest.path / manifest.data["report"]["markdown"] if "report" in manifest.data else None
    if report is not None:
        sys.stdout.write(report.read_text())
    sys.stdout.write(f"wrote {manifest.path} (default variant: {manifest.default_variant})\n")


def _read_samples(path: Path | None) -> list | None:
    if path is None:
        return None
    if not path.exists():
        from compress.errors import ExportError

        raise ExportError(f"--samples {path} does not exist; give a text file (one text per line) or an image folder")
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [line for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
