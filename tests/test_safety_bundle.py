"""What `verify` and `load` promise about a bundle (issue 14, items 6 and 7): a manifest whose content is wrong is
refused with one line at read time, and the bundle digest pins the exact bundle an app was tested with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from serve import runtime
from serve.bundle.manifest import BundleError, bundle_digest, check_digest, read_manifest, sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Edit = Callable[[dict], None]


def broken_copy(bundle: Path, tmp_path: Path, edit: Edit) -> Path:
    """A copy of `bundle` whose manifest.json went through `edit` (the files, and their sha256, untouched)."""
    copy = shutil.copytree(bundle, tmp_path / bundle.name)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))
    return copy


def each_variant(edit: Callable[[dict], None]) -> Edit:
    return lambda data: [edit(v) for v in data["variants"].values()]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_refused(bundle: Path, expected: str) -> None:
    """read_manifest (with and without the files' hashes) and runtime.load refuse the bundle with one line."""
    for call in (lambda: read_manifest(bundle), lambda: read_manifest(bundle, verify=False),
                 lambda: runtime.load(bundle)):
        with pytest.raises(BundleError) as err:
            call()
        message = str(err.value)
        assert expected in message and "\n" not in message, message
        assert message.endswith(("re-export the bundle", "re-export the bundle with this version")), message


# --- item 6: the manifest's content is checked when it is read -------------------------------------------------------

IMAGE_CASES: list[tuple[str, Edit, str]] = [
    ("labels shorter than the logits", lambda d: d.update(labels=d["labels"][:2]),
     "outputs 3 logits per input but the manifest has 2 labels ['cat', 'dog']"),
    ("labels longer than the logits", lambda d: d.update(labels=[*d["labels"], "owl"]),
     "outputs 3 logits per input but the manifest has 4 labels"),
    ("a repeated label", lambda d: d.update(labels=["cat", "dog", "cat"]), "'labels' repeats ['cat']"),
    ("labels that are not names", lambda d: d.update(labels="cat,dog,fox"), "'labels' must be a non-empty list"),
    ("an unknown session setting", each_variant(lambda v: v["session"].update(intra_op_num_threads=64)),
     "asks for session settings ['intra_op_num_threads'], which this tuneforge does not know"),
    ("an unknown optimization level", each_variant(lambda v: v["session"].update(graph_optimization_level="ORT_MAX")),
     "session graph_optimization_level 'ORT_MAX' is not one of ORT_DISABLE_ALL"),
    ("disabled optimizers not a list", each_variant(lambda v: v["session"].update(disabled_optimizers="Gelu")),
     "session disabled_optimizers must be a list of optimizer names"),
    ("no preprocessing", lambda d: d.pop("preprocessing"), "an image bundle needs 'preprocessing'"),
    ("preprocessing size of one number", lambda d: d["preprocessing"].update(size=[24]),
     "preprocessing size must be [height, width] in pixels, got [24]"),
    ("an unknown color mode", lambda d: d["preprocessing"].update(color_mode="CMYK"),
     "preprocessing color_mode must be 'L' or 'RGB'"),
    ("a zero std", lambda d: d["preprocessing"].update(std=[0.0, 0.2, 0.3]), "preprocessing std must be positive"),
    ("a mean per channel missing", lambda d: d["preprocessing"].update(mean=[0.5]),
     "preprocessing mean must be 3 number(s) for color mode RGB"),
    ("an unknown preprocessing key", lambda d: d["preprocessing"].update(crop=8),
     "'preprocessing' has unknown keys ['crop']"),
    ("a size the graph does not take", lambda d: d["preprocessing"].update(size=[32, 32]),
     "takes images of shape [3, 24, 20] (channels, height, width) but preprocessing makes [3, 32, 32]"),
    ("a graph without outputs", each_variant(lambda v: v["graphs"]["model"].update(outputs=[])),
     "the model graph's 'outputs' must be a list of {name, dtype, shape}"),
    ("a sha256 that is not one", lambda d: d["files"].update({"fp32.onnx": "abc"}),
     "files['fp32.onnx'] is 'abc', not a sha256"),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])
def test_an_image_bundle_whose_manifest_says_something_wrong_is_refused(serve_image_bundle: Path, tmp_path: Path,
                                                                         edit: Edit, expected: str):
    assert_refused(broken_copy(serve_image_bundle, tmp_path, edit), expected)


LM_CASES: list[tuple[str, Edit, str]] = [
    ("no cache", lambda d: d.pop("cache"), "a causal-lm bundle needs 'cache'"),
    ("no generation", lambda d: d.pop("generation"), "a causal-lm bundle needs 'generation'"),
    ("a cache with more layers than the graph", lambda d: d["cache"].update(num_layers=3),
     "the decoder graph has no tensor 'past_key_values.2.key', which 'cache' names (3 layers)"),
    ("a cache with fewer layers than the graph", lambda d: d["cache"].update(num_layers=1),
     "the decoder graph takes 'past_key_values.1.key' but 'cache' has only 1 layers"),
    ("a cache claiming 10**12 layers", lambda d: d["cache"].update(num_layers=10**12),
     "the decoder graph has no tensor 'past_key_values.2.key', which 'cache' names (1000000000000 layers)"),
    ("a cache name without its layer", lambda d: d["cache"].update(past_key="past_key"),
     "cache past_key must be a tensor name pattern with {i}"),
    ("a cache dtype numpy cannot make", lambda d: d["cache"].update(dtype="bfloat17"),
     "cache dtype must be one of float32"),
    ("max_new_tokens as text", lambda d: d["generation"].update(max_new_tokens="5"),
     "generation max_new_tokens must be an integer >= 1; got '5' (str)"),
    ("a negative temperature", lambda d: d["generation"].update(temperature=-1),
     "generation temperature must be a number >= 0"),
    ("no pad token", lambda d: d["generation"].pop("pad_token_id"), "generation pad_token_id must be a token id"),
    ("no decoder graph", each_variant(lambda v: v["graphs"].pop("decoder")),
     "has no 'decoder' graph (graphs: model); a causal-lm bundle needs model and decoder"),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in LM_CASES], ids=[c[0] for c in LM_CASES])
def test_a_causal_lm_bundle_without_what_generation_needs_is_refused(serve_lm_bundle: Path, tmp_path: Path,
                                                                      edit: Edit, expected: str):
    assert_refused(broken_copy(serve_lm_bundle, tmp_path, edit), expected)


TEXT_CASES: list[tuple[str, Edit, str]] = [
    ("one label for two logits", lambda d: d.update(labels=["positive"]),
     "outputs 2 logits per input but the manifest has 1 labels ['positive']"),
    ("a max_length as text", lambda d: d["text"].update(max_length="24"),
     "text max_length must be a positive integer or null, got '24'"),
    ("a pair column that is not a name", lambda d: d["text"].update(text_pair_column=1),
     "text text_pair_column must be a column name or null"),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_a_text_bundle_whose_manifest_says_something_wrong_is_refused(serve_pair_bundle: Path, tmp_path: Path,
                                                                       edit: Edit, expected: str):
    assert_refused(broken_copy(serve_pair_bundle, tmp_path, edit), expected)


def test_verify_refuses_a_bad_manifest_with_one_line(serve_image_bundle: Path, tmp_path: Path):
    """`python -m compress verify` said ok for these before; now it exits 2 with one line naming the problem."""
    short = broken_copy(serve_image_bundle, tmp_path / "short", lambda d: d.update(labels=d["labels"][:2]))
    no_spec = broken_copy(serve_image_bundle, tmp_path / "nospec", lambda d: d.pop("preprocessing"))
    for bundle, expected in [(short, "outputs 3 logits per input but the manifest has 2 labels"),
                             (no_spec, "an image bundle needs 'preprocessing'")]:
        proc = cli("verify", str(bundle))
        assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and expected in lines[-1], lines


def test_every_bundle_the_tests_export_passes_the_checks(serve_image_bundle: Path, serve_lm_bundle: Path,
                                                         serve_pair_bundle: Path, serve_text_bundle: Path):
    """The checks describe what export writes: text (2 variants), pair, image and causal-LM bundles all read."""
    for bundle in (serve_image_bundle, serve_lm_bundle, serve_pair_bundle, serve_text_bundle):
        assert read_manifest(bundle).task


# --- item 7: a digest over the whole bundle -------------------------------------------------------------------------

def test_bundle_digest_is_the_documented_hash_and_does_not_depend_on_the_folder(serve_image_bundle: Path,
                                                                                tmp_path: Path):
    digest = bundle_digest(serve_image_bundle)
    files = json.loads((serve_image_bundle / "manifest.json").read_text())["files"]
    lines = [f"manifest.json {sha256_file(serve_image_bundle / 'manifest.json')}\n"]
    lines += [f"{rel} {sha256_file(serve_image_bundle / rel)}\n" for rel in sorted(files)]
    want = hashlib.sha256(b"tuneforge-bundle-digest 1\n" + "".join(lines).encode()).hexdigest()
    assert digest == f"sha256:{want}"
    moved = shutil.copytree(serve_image_bundle, tmp_path / "elsewhere" / "renamed")
    (moved / "NOTES.txt").write_text("a file the manifest does not list does not count")
    assert bundle_digest(moved) == digest == bundle_digest(serve_image_bundle)
    assert check_digest(moved, digest) == check_digest(moved, want.upper()) == digest


def test_a_graph_edited_with_its_sha256_passes_verify_but_not_the_pinned_digest(serve_image_bundle: Path,
                                                                               tmp_path: Path):
    """The per-file sha256 catch corruption, not someone who rewrites the manifest too: the digest does."""
    pinned = bundle_digest(serve_image_bundle)
    bundle = shutil.copytree(serve_image_bundle, tmp_path / "bundle")
    graph = bundle / "fp32.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")  # stands for any edit of the graph
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["fp32.onnx"] = sha256_file(graph)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    read_manifest(bundle)  # every file matches its (rewritten) sha256: verify cannot tell

    proc = cli("verify", str(bundle))
    assert proc.returncode == 0 and json.loads(proc.stdout)["digest"] != pinned
    proc = cli("verify", str(bundle), "--expect", pinned)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"not the expected {pinned}: it is not the bundle that was pinned" in last
    with pytest.raises(BundleError, match="it is not the bundle that was pinned"):
        runtime.load(bundle, expect_digest=pinned)

    relabelled = broken_copy(serve_image_bundle, tmp_path / "relabelled", lambda d: d.update(labels=["dog", "cat",
                                                                                                    "fox"]))
    with pytest.raises(BundleError, match="it is not the bundle that was pinned"):
        runtime.load(relabelled, expect_digest=pinned)  # only the manifest changed: no file hash covers it


def test_verify_prints_the_digest_and_expect_accepts_it(serve_image_bundle: Path):
    proc = cli("verify", str(serve_image_bundle))
    assert proc.returncode == 0, proc.stderr
    digest = json.loads(proc.stdout)["digest"]
    assert digest == bundle_digest(serve_image_bundle)
    proc = cli("verify", str(serve_image_bundle), "--expect", digest)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stderr
    model = runtime.load(serve_image_bundle, expect_digest=digest)
    assert model.labels == ["cat", "dog", "fox"]
    for bad in ("abc", "md5:" + "0" * 32):
        with pytest.raises(BundleError, match="is not sha256:<64 hex digits>"):
            runtime.load(serve_image_bundle, expect_digest=bad)
