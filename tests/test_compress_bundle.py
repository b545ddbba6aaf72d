"""The bundle reader and writer, the parity gate's rules on made-up outputs, and the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, make_image_run

from compress.bundle import add_variant, export_bundle
from compress.errors import ParityError
from compress.parity import Case, ParityConfig, check_graph
from serve.bundle.manifest import BundleError, read_manifest, sha256_file
from serve.bundle.records import VariantRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_run(tmp_path_factory.mktemp("image") / "run")


@pytest.fixture(scope="module")
def exported(image_run: Path) -> Path:
    return export_bundle(image_run, image_run.parent / "bundle").path


@pytest.fixture
def bundle(exported: Path, tmp_path: Path) -> Path:
    """A fresh copy of an fp32 image bundle, for a test to break."""
    return shutil.copytree(exported, tmp_path / "bundle")


def edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- the reader ----------------------------------------------------------------------------------------------------

def test_read_manifest_checks_every_file(bundle: Path):
    manifest = read_manifest(bundle)
    assert manifest.graph_path() == bundle / "fp32.onnx"
    assert manifest.data["files"]["fp32.onnx"] == sha256_file(bundle / "fp32.onnx")

    (bundle / "fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"is incomplete: fp32.onnx is missing \(listed in manifest.json\)"):
        read_manifest(bundle)


def test_read_manifest_refuses_a_changed_file(bundle: Path):
    with open(bundle / "fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"fp32\.onnx does not match its sha256"):
        read_manifest(bundle)
    assert read_manifest(bundle, verify=False).task == "image-classification"  # existence is still checked


@pytest.mark.parametrize(("changes", "expected"), [
    ({"format_version": 2}, "has format_version 2, this tuneforge reads version 1"),
    ({"format_version": "1"}, "has format_version '1'"),
    ({"format": "something-else"}, "is not a tuneforge-bundle manifest (format: 'something-else')"),
    ({"task": "speech"}, "is for task 'speech', which this tuneforge does not know"),
    ({"default_variant": "int8"}, "default_variant 'int8' is not among the variants (fp32)"),
    ({"files": ["fp32.onnx"]}, "'variants' and 'files' must be mappings"),
    ({"files": {"../outside.onnx": "0" * 64}}, "lists '../outside.onnx', a path outside the bundle folder"),
    ({"files": {"/etc/hostname": "0" * 64}}, "lists '/etc/hostname', a path outside the bundle folder"),
    ({"variants": {"fp32": {}}}, "variant 'fp32' has no 'graphs' mapping"),
    ({"task": "text-classification"}, "the tokenizer 'tokenizer.json' is not in 'files'"),
])
def test_read_manifest_names_what_is_wrong(bundle: Path, changes: dict, expected: str):
    edit_manifest(bundle, **changes)
    with pytest.raises(BundleError) as err:
        read_manifest(bundle)
    assert expected in str(err.value)


def test_read_manifest_of_a_folder_that_is_not_a_bundle(tmp_path: Path):
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"it has no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="is not valid JSON"):
        read_manifest(tmp_path)


# --- the writer ----------------------------------------------------------------------------------------------------

def test_overwrite_replaces_a_bundle_and_nothing_else(image_run: Path, bundle: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    for target in (notes, image_run):  # a folder of other files, the source run itself
        with pytest.raises(BundleError, match="it is not a tuneforge bundle"):
            export_bundle(image_run, target, overwrite=True)
    assert (notes / "keep.txt").read_text() == "mine" and (image_run / "model").is_dir()

    (bundle / "notes.txt").write_text("the user's, put in the bundle folder")  # a bundle never writes it
    with pytest.raises(BundleError, match=r"it holds notes\.txt, which a tuneforge bundle never holds"):
        export_bundle(image_run, bundle, overwrite=True)
    assert (bundle / "notes.txt").is_file()
    (bundle / "notes.txt").unlink()
    assert export_bundle(image_run, bundle, overwrite=True).path == bundle
    assert read_manifest(bundle).variants.keys() == {"fp32"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "notes"]  # no temp or old folder left

    monkeypatch.chdir(bundle)
    with pytest.raises(BundleError, match="the current folder is inside it"):
        export_bundle(image_run, ".", overwrite=True)
    assert read_manifest(bundle).variants.keys() == {"fp32"}


def test_add_variant_commits_through_the_manifest(bundle: Path, tmp_path: Path):
    copy = tmp_path / "elsewhere.onnx"
    shutil.copyfile(bundle / "fp32.onnx", copy)
    manifest = add_variant(bundle, "copy", {"model": copy}, VariantRecord(
        parent="fp32", parity={"passed": True}, quantization={"method": "none"}), default=True)
    assert manifest.default_variant == "copy" and manifest.graph_path() == bundle / "copy.onnx"
    entry = manifest.variants["copy"]
    assert entry["quantization"] == {"method": "none"} and entry["pruning"] is None
    assert entry["graphs"]["model"]["inputs"][0]["name"] == "pixel_values"
    assert manifest.data["files"]["copy.onnx"] == manifest.data["files"]["fp32.onnx"]
    assert sorted(p.name for p in bundle.iterdir()) == ["copy.onnx", "fp32.onnx", "manifest.json"]

    gated = VariantRecord(parent="fp32", parity={"passed": True})
    with pytest.raises(BundleError, match="already has a variant 'copy'"):
        add_variant(bundle, "copy", {"model": copy}, gated)
    with pytest.raises(BundleError, match=r"must provide the graphs \['model'\]"):
        add_variant(bundle, "two", {"model": copy, "decoder": copy}, gated)
    with pytest.raises(ValueError, match="needs the verdict of its gate"):
        VariantRecord(parent="fp32")
    assert read_manifest(bundle).variants.keys() == {"fp32", "copy"}


# --- the gate's rules, on made-up outputs ----------------------------------------------------------------------------

class FakeSession:
    """Stands in for an onnxruntime session that returns fixed outputs."""

    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = outputs

    def get_inputs(self):
        return [SimpleNamespace(name="x")]

    def get_outputs(self):
        return [SimpleNamespace(name=n) for n in self.outputs]

    def run(self, names, feeds):
        return list(self.outputs.values())


def gate(got: np.ndarray, want: np.ndarray, config: ParityConfig, mask: np.ndarray | None = None) -> dict:
    case = Case("batch 2", {"x": np.zeros(1)}, {"logits": mask} if mask is not None else {})
    return check_graph(FakeSession({"logits": got}), lambda feeds: {"logits": want}, [case], config=config,
                       label="test graph")


def test_gate_passes_within_tolerance_and_reports_the_differences():
    want = np.array([[1.0, -2.0, 0.5], [0.1, 0.2, 3.0]], dtype=np.float32)
    record = gate(want + np.float32(5e-5), want, ParityConfig())
    assert record["passed"] and record["max_abs_diff"] == pytest.approx(5e-5, rel=1e-2)
    assert record["max_rel_diff"] == pytest.approx(5e-4, rel=1e-2)  # 5e-5 / 0.1, the smallest |torch|
    assert record["top1_agreement"] == 1.0


def test_gate_fails_beyond_tolerance_naming_the_worst_element():
    want = np.array([[1.0, -2.0, 0.5], [0.1, 0.2, 3.0]], dtype=np.float32)
    got = want.copy()
    got[1, 2] = 3.5
    with pytest.raises(ParityError) as err:
        gate(got, want, ParityConfig(atol=1e-4, rtol=1e-3))
    message = str(err.value)
    assert message.startswith("test graph does not match PyTorch (atol 0.0001, rtol 0.001, top-1 >= 100%)")
    assert "logits [batch 2]: max abs diff 0.5 (onnx 3.5 vs torch 3 at [1, 2])" in message


def test_gate_fails_when_the_reference_itself_is_nan():
    want = np.array([[np.nan, 1.0]], dtype=np.float32)
    for got in (np.array([[np.nan, 50.0]], dtype=np.float32), np.array([[np.nan, 1.0]], dtype=np.float32)):
        with pytest.raises(ParityError, match=r"onnx nan vs torch nan at \[0, 0\]"):
            gate(got, want, ParityConfig())


def test_gate_fails_on_nan_and_ignores_masked_positions():
    want = np.ones((2, 3, 4), dtype=np.float32)
    got = want.copy()
    got[0, 0] = np.nan  # a padded position
    with pytest.raises(ParityError, match="max abs diff inf"):
        gate(got, want, ParityConfig())
    mask = np.ones((2, 3, 1), dtype=bool)
    mask[0, 0] = False
    assert gate(got, want, ParityConfig(), mask)["passed"]


def test_gate_top1_excuses_near_ties_but_not_flips():
    want = np.array([[1.0, 0.99995, -1.0]], dtype=np.float32)  # torch's top two within atol: a near tie
    got = np.array([[0.99997, 0.99999, -1.0]], dtype=np.float32)
    assert gate(got, want, ParityConfig())["top1_agreement"] == 1.0
    want = np.array([[1.0, 0.85]], dtype=np.float32)
    got = np.array([[0.93, 0.94]], dtype=np.float32)  # every element within atol 0.1, yet the argmax flips
    with pytest.raises(ParityError, match=r"top-1 agreement 0.0% of 1"):
        gate(got, want, ParityConfig(atol=0.1, rtol=0.0))


# --- the command line ----------------------------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_export_verify_and_errors(image_run: Path, tmp_path: Path):
    out = tmp_path / "bundle"
    proc = cli("export", str(image_run), "--out", str(out), "--optimize")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fp32: fp32.onnx,") and lines[1].startswith("optimized: optimized.onnx,")
    assert lines[-1] == f"wrote {out}"

    proc = cli("verify", str(out))
    assert proc.returncode == 0 and json.loads(proc.stdout)["variants"].keys() == {"fp32", "optimized"}

    (out / "optimized.onnx").write_bytes(b"tampered")
    for args, expected in [(("verify", str(out)), "optimized.onnx does not match its sha256"),
                           (("export", str(image_run), "--out", str(out)), "already exists and is not empty")]:
        proc = cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, last
