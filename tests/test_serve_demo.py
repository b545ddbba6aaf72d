"""The Gradio demo as users meet it: `python -m serve` in a subprocess on a free loopback port, called through
gradio_client (every endpoint, bad inputs, a bounded load test) and driven in a real headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from serve import runtime
from serve.app import demo_command
from serve.sketch import sketch_to_image

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
UPLOAD_LIMIT_MB = 0.05  # small, so the test's "too large" image stays small
TEXT_VARIANTS = ["text/optimized", "text/fp32", "run/pytorch"]  # two sources of one task: keys are source/variant


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo(serve_text_bundle: Path, text_run: Path, serve_image_bundle: Path, serve_lm_bundle: Path,
         tmp_path_factory: pytest.TempPathFactory):
    """The demo on a text bundle (2 variants) + its run (PyTorch), an image bundle and a causal-LM bundle."""
    assert serve_text_bundle.name == "text" and text_run.name == "run"
    logs = tmp_path_factory.mktemp("demo")
    proc, url = start_demo([serve_text_bundle, text_run, serve_image_bundle, serve_lm_bundle, "--threads", "1",
                            "--max-upload-mb", str(UPLOAD_LIMIT_MB)], logs)
    yield {"url": url, "proc": proc, "log": logs / "demo.log"}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_demo(args: list, logs: Path, env: dict[str, str] | None = None,
               ready: str = "/gradio_api/info") -> tuple[subprocess.Popen, str]:
    """`python -m serve ARGS --port <free>` with Gradio's cache in logs/gradio, once `ready` answers (or 401)."""
    port = free_port()
    command = [sys.executable, "-m", "serve", *map(str, args), "--port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(logs / "gradio"),
           "OMP_NUM_THREADS": "1", **(env or {})}
    with open(logs / "demo.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the demo exited ({proc.returncode}):\n{(logs / 'demo.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}{ready}", timeout=5) as response:
                if response.status == 200:
                    break
        except urllib.error.HTTPError as err:
            if err.code == 401:  # up, behind its login
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the demo did not answer in 180 s:\n{(logs / 'demo.log').read_text()[-4000:]}")
        time.sleep(0.5)
    return proc, url


def client(demo: dict):
    from gradio_client import Client

    return Client(demo["url"], verbose=False)


def label_of(update: dict) -> dict[str, float]:
    """{label: confidence} from a gr.Label update as gradio_client returns it."""
    return {c["label"]: c["confidence"] for c in update["value"]["confidences"]}


def sketch_value(path: Path) -> dict:
    from gradio_client import handle_file

    return {"background": None, "layers": [], "composite": handle_file(str(path))}


# --- every endpoint -------------------------------------------------------------------------------------------------

def test_every_endpoint_answers_as_the_runtime_does(demo: dict, serve_text_bundle: Path, serve_image_bundle: Path,
                                                    serve_lm_bundle: Path, tmp_path: Path):
    from gradio_client import handle_file

    api = client(demo)
    assert set(api.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/classify_text", "/classify_image", "/classify_sketch", "/generate", "/explain_text", "/explain_image",
        "/explain_sketch"}

    *labels, table = api.predict("the movie was good and nice", "", TEXT_VARIANTS, api_name="/classify_text")
    assert [row[0] for row in table["data"]] == TEXT_VARIANTS and table["headers"][:2] == ["variant", "prediction"]
    for key, update in zip(TEXT_VARIANTS, labels, strict=True):
        assert update["visible"] and update["label"].startswith(f"{key} · ") and update["label"].endswith(" ms")
        if key != "run/pytorch":
            want = runtime.load(serve_text_bundle, key.split("/")[1]).predict(["the movie was good and nice"])[0]
            assert label_of(update) == pytest.approx(want.probabilities, abs=1e-6)
    np.testing.assert_allclose(list(label_of(labels[2]).values()), list(label_of(labels[1]).values()), atol=1e-4)

    image = np.random.default_rng(0).integers(0, 256, (30, 27, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    *labels, table, seen = api.predict(handle_file(str(tmp_path / "photo.png")), ["fp32"], api_name="/classify_image")
    want = runtime.load(serve_image_bundle).predict([image])[0]
    assert label_of(labels[0]) == pytest.approx(want.probabilities, abs=1e-6)
    assert table["data"][0][:2] == ["fp32", want.label] and Path(seen).is_file()

    canvas = np.zeros((280, 280, 4), dtype=np.uint8)
    canvas[60:220, 130:150] = (0, 0, 0, 255)  # a "1": black ink on the transparent canvas
    Image.fromarray(canvas).save(tmp_path / "sketch.png")
    *labels, table, seen = api.predict(sketch_value(tmp_path / "sketch.png"), ["fp32"], api_name="/classify_sketch")
    model = runtime.load(serve_image_bundle)
    want = model.predict([sketch_to_image(canvas, model.spec)])[0]
    assert label_of(labels[0]) == pytest.approx(want.probabilities, abs=1e-6)

    prompt = "The quick brown fox"
    job = api.submit(prompt, False, 12, 0.0, 0, 1.0, 1.0, 0, ["fp32"], api_name="/generate")
    updates = list(job)
    text, table = job.result()
    assert text["value"] == runtime.load(serve_lm_bundle).complete(prompt, do_sample=False, max_new_tokens=12,
                                                                   top_k=0, top_p=1.0, repetition_penalty=1.0)
    assert len(updates) > 2, "generation must stream"
    assert table["data"][0][:2] == ["fp32", 12]


def test_bad_inputs_get_the_demos_error_and_the_server_keeps_serving(demo: dict, tmp_path: Path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.png").write_text("not an image either")
    noise = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)  # ~68 kB as PNG: over 50 kB
    Image.fromarray(noise).save(tmp_path / "large.png")
    Image.fromarray(np.zeros((280, 280, 4), dtype=np.uint8)).save(tmp_path / "blank.png")
    settings = (False, 8, 0.7, 0, 0.9, 1.0, 0)
    cases = [
        (("", "", ["text/fp32"]), "/classify_text", "Enter the text to classify: it is empty."),
        (("   \n", "", ["text/fp32"]), "/classify_text", "Enter the text to classify: it is empty."),
        (("x" * 20_001, "", ["text/fp32"]), "/classify_text", "this demo takes up to 20,000"),
        (("good", "", []), "/classify_text", "Select at least one variant."),
        (("good", "", ["int4"]), "/classify_text", "'int4' (type: <class 'str'>) is not in the list of choices"),
        ((None, ["fp32"]), "/classify_image", "Upload an image first."),
        ((handle_file(str(tmp_path / "notes.txt")), ["fp32"]), "/classify_image", "Invalid file type"),
        ((handle_file(str(tmp_path / "fake.png")), ["fp32"]), "/classify_image", "is not an image the demo can read"),
        ((handle_file(str(tmp_path / "large.png")), ["fp32"]), "/classify_image", "takes images up to 0.05 MB"),
        ((sketch_value(tmp_path / "blank.png"), ["fp32"]), "/classify_sketch", "Draw something on the sketchpad"),
        (("", *settings, ["fp32"]), "/generate", "Enter the prompt: it is empty."),
        (("Hello", *settings, []), "/generate", "Select at least one variant."),
    ]
    api = client(demo)
    for args, endpoint, message in cases:
        with pytest.raises(AppError) as err:
            api.predict(*args, api_name=endpoint)
        assert message in str(err.value), f"{endpoint}{args[:1]}: {err.value}"
        assert api.predict("good", "", ["text/fp32"], api_name="/classify_text")[-1]["data"][0][0] == "text/fp32"
    assert demo["proc"].poll() is None


def test_explain_endpoints_answer_as_the_runtime_does(demo: dict, serve_text_bundle: Path, serve_image_bundle: Path,
                                                      tmp_path: Path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from serve.explain import explain

    api = client(demo)
    text = "the movie was good and nice but the product was broken"
    update = api.predict(text, "", True, "occlusion", ["text/fp32", "run/pytorch"], api_name="/explain_text")
    want = explain(runtime.load(serve_text_bundle, "fp32"), text, method="occlusion")
    assert update["visible"] and update["label"].startswith(f"text/fp32 · occlusion toward '{want.target}' · "
                                                            f"{len(want.words) + 1} model calls · ")
    chunks = [(c["token"], c["class_or_confidence"]) for c in update["value"]]
    assert "".join(token for token, _ in chunks) == text
    np.testing.assert_allclose([v for _, v in chunks if v is not None], [v for _, v in want.highlighted()
                                                                         if v is not None], atol=1e-3)
    assert api.predict(text, "", False, "shap", ["text/fp32"], api_name="/explain_text") == {
        "visible": False, "__type__": "update"}
    if importlib.util.find_spec("captum"):  # the explain extra (in dev): integrated gradients for the run
        update = api.predict(text, "", True, "integrated-gradients", ["run/pytorch"], api_name="/explain_text")
        assert update["label"].startswith("run/pytorch · integrated-gradients toward ")
        assert [c["token"] for c in update["value"] if c["class_or_confidence"] is not None] == want.words

    image = np.random.default_rng(0).integers(0, 256, (30, 27, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    update = api.predict(handle_file(str(tmp_path / "photo.png")), True, "rise", ["fp32"], api_name="/explain_image")
    target = runtime.load(serve_image_bundle).predict([image])[0].label
    assert update["label"].startswith(f"fp32 · rise toward '{target}' · 513 model calls · ")
    assert Image.open(update["value"]).size == (288, 320)  # the 27x30 upload, shown 320 px high
    canvas = np.zeros((280, 280, 4), dtype=np.uint8)
    canvas[60:220, 130:150] = (0, 0, 0, 255)
    Image.fromarray(canvas).save(tmp_path / "sketch.png")
    update = api.predict(sketch_value(tmp_path / "sketch.png"), True, "occlusion", ["fp32"],
                         api_name="/explain_sketch")
    assert update["visible"] and " · occlusion toward " in update["label"]

    cases = [((text, "", True, "lime", ["text/fp32"]), "/explain_text", "not in the list of choices"),
             (("  ", "", True, "shap", ["text/fp32"]), "/explain_text", "Enter the text to explain: it is empty."),
             ((None, True, "rise", ["fp32"]), "/explain_image", "Upload an image first.")]
    if importlib.util.find_spec("captum"):
        cases.append(((text, "", True, "integrated-gradients", ["text/fp32"]), "/explain_text",
                      "select a run variant first"))
    for args, endpoint, message in cases:
        with pytest.raises(AppError) as err:
            api.predict(*args, api_name=endpoint)
        assert message in str(err.value), f"{endpoint}{args[:1]}: {err.value}"
    assert demo["proc"].poll() is None


def test_demo_command_and_cli_errors(tmp_path: Path):
    assert demo_command("bundles/reviews", python=".venv/bin/python") == ".venv/bin/python -m serve bundles/reviews"
    assert demo_command(Path("my bundle")).endswith(" -m serve 'my bundle'")
    proc = subprocess.run([sys.executable, "-m", "serve", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "is neither a bundle" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "serve", str(tmp_path), "--auth", "nopassword"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--auth must be USER:PASS (both non-empty)" in proc.stderr


# --- who can use the demo, and what it leaves on disk (issue 14, item 9) ----------------------------------------------

def test_the_login_comes_from_a_file_or_the_environment(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from serve.errors import ServeError
    from serve.login import AUTH_ENV, demo_auth

    (tmp_path / "login.txt").write_text("ada:pa:ss word\n")
    assert demo_auth(None, tmp_path / "login.txt", environ={}) == ("ada", "pa:ss word")
    assert demo_auth(None, None, environ={AUTH_ENV: "bob:secret"}) == ("bob", "secret")
    assert demo_auth(None, None, environ={}) is None
    with caplog.at_level("WARNING", logger="serve.login"):
        assert demo_auth("cy:pw", None, environ={AUTH_ENV: "bob:secret"}) == ("cy", "pw")  # the flag wins
    assert "other users of this machine can read it (ps); prefer --auth-file PATH" in caplog.text
    (tmp_path / "empty.txt").write_text("")
    for args, environ, message in [
        (("a:b", tmp_path / "login.txt"), {}, "give the login once: --auth USER:PASS or --auth-file PATH, not both"),
        ((None, tmp_path / "missing.txt"), {}, "cannot read the login file"),
        ((None, tmp_path / "empty.txt"), {}, "the first line of .*empty.txt must be USER:PASS"),
        ((None, None), {AUTH_ENV: "nopassword"}, f"\\${AUTH_ENV} must be USER:PASS"),
    ]:
        with pytest.raises(ServeError, match=message):
            demo_auth(*args, environ=environ)


@pytest.mark.parametrize(("host", "share", "auth", "warning"), [
    ("0.0.0.0", False, None, "the demo listens on 0.0.0.0 without a login: anyone who can reach this machine"),
    ("192.168.1.5", False, None, "the demo listens on 192.168.1.5 without a login"),
    ("demo.example.org", False, None, "the demo listens on demo.example.org without a login"),
    ("127.0.0.1", True, None, "--share without a login: anyone with the gradio.live link"),
    ("127.0.0.1", False, None, None), ("localhost", False, None, None), ("::1", False, None, None),
    ("0.0.0.0", True, ("a", "b"), None),
])
def test_a_demo_reachable_from_a_network_without_a_login_warns(host: str, share: bool, auth, warning: str | None,
                                                                caplog: pytest.LogCaptureFixture):
    from serve.login import warn_if_exposed

    with caplog.at_level("WARNING", logger="serve.login"):
        warn_if_exposed(host, share, auth)
    assert (warning in caplog.text) if warning else caplog.text == ""


def test_failed_logins_are_slowed_one_at_a_time_then_locked_out(caplog: pytest.LogCaptureFixture):
    """Gradio's own check answered 100 wrong passwords in 1.1 s; the throttle answers failures one at a time,
    `delay_s` each, and locks every login after `max_failures` in a row."""
    import asyncio

    from serve.login import LoginThrottle

    now = [0.0]
    delay = 0.2
    throttle = LoginThrottle("ada", "secret", delay_s=delay, max_failures=10, lockout_s=60, clock=lambda: now[0])

    async def attempts(pairs: list[tuple[str, str]]) -> tuple[list[bool], float]:
        start = time.perf_counter()
        results = await asyncio.gather(*(throttle.check(user, password) for user, password in pairs))
        return list(results), time.perf_counter() - start

    async def scenario() -> None:
        results, elapsed = await attempts([("ada", "secret")])
        assert results == [True] and elapsed < delay / 2  # no delay when right
        results, elapsed = await attempts([("ada", f"guess{i}") for i in range(8)] + [("eve", "secret")])
        assert results == [False] * 9 and elapsed >= 9 * delay  # parallel guesses queue: 9 x the delay
        assert (await attempts([("ada", "secret")]))[0] == [True] and throttle.failures == 0  # success resets
        with caplog.at_level("WARNING", logger="serve.login"):
            assert (await attempts([("ada", f"guess{i}") for i in range(10)]))[0] == [False] * 10
        assert "10 failed logins in a row: every login is refused for the next 60 s" in caplog.text
        assert (await attempts([("ada", "secret")]))[0] == [False]  # locked out, the right password too
        now[0] += 61
        assert (await attempts([("ada", "secret")]))[0] == [True]

    asyncio.run(scenario())


def test_demo_behind_a_login_throttles_guesses_and_deletes_uploads_when_stopped(serve_image_bundle: Path,
                                                                                tmp_path: Path):
    """The login from $TUNEFORGE_DEMO_AUTH (not on the command line, so not in `ps`), wrong passwords answered
    slowly, and on SIGTERM: Gradio's cache (uploads, refused ones included, and returned images) emptied and the
    demo's temp folder of example images removed."""
    import signal

    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    temp, logs = tmp_path / "tmp", tmp_path / "logs"
    temp.mkdir()
    logs.mkdir()
    proc, url = start_demo([serve_image_bundle, "--threads", "1", "--max-upload-mb", str(UPLOAD_LIMIT_MB)], logs,
                           env={"TUNEFORGE_DEMO_AUTH": "ada:s3cret word", "TMPDIR": str(temp)}, ready="/config")
    try:
        assert "s3cret" not in " ".join(proc.args)
        assert len(list(temp.glob("tuneforge-demo-*"))) == 1  # where eval images for gr.Examples are written
        with httpx.Client(timeout=60) as http:
            assert http.get(f"{url}/config").status_code == 401
            start = time.perf_counter()
            wrong = [http.post(f"{url}/login", data={"username": "ada", "password": f"guess{i}"}) for i in range(3)]
            assert [r.status_code for r in wrong] == [400] * 3 and time.perf_counter() - start >= 3 * 0.9
            assert http.post(f"{url}/login", data={"username": "ada", "password": "s3cret word"}).status_code == 200

        api = Client(url, auth=("ada", "s3cret word"), verbose=False)
        Image.fromarray(np.full((24, 20, 3), 200, np.uint8)).save(tmp_path / "small.png")
        noise = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)  # ~68 kB: over 50 kB
        Image.fromarray(noise).save(tmp_path / "large.png")
        assert api.predict(handle_file(str(tmp_path / "small.png")), ["fp32"], api_name="/classify_image")
        with pytest.raises(AppError, match=r"takes images up to 0\.05 MB"):
            api.predict(handle_file(str(tmp_path / "large.png")), ["fp32"], api_name="/classify_image")
        cached = [p for p in (logs / "gradio").rglob("*") if p.is_file()]
        assert any(p.name == "large.png" for p in cached), cached  # the refused upload sat in the cache
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log = (logs / "demo.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert [p for p in (logs / "gradio").rglob("*") if p.is_file()] == [], log[-3000:]
    assert list(temp.glob("tuneforge-demo-*")) == []


# --- load -----------------------------------------------------------------------------------------------------------

def call_api(http, url: str, endpoint: str, data: list) -> list:
    """One request through Gradio's HTTP API (what gradio_client does, minus its per-call threads): POST the inputs,
    then read the event stream to its `complete` (the outputs) or `error` event."""
    response = http.post(f"{url}/gradio_api/call/{endpoint}", json={"data": data})
    response.raise_for_status()
    event = None
    with http.stream("GET", f"{url}/gradio_api/call/{endpoint}/{response.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event in ("complete", "error"):
                if event == "error":
                    raise RuntimeError(f"{endpoint} answered an error: {line}")
                return json.loads(line[len("data: "):])
    raise RuntimeError(f"{endpoint}: the event stream ended without a result")


def test_load_8_clients_x_200_requests_without_errors(demo: dict):
    """8 concurrent HTTP clients, 200 requests each, to the demo's API on loopback: 0 errors; p50 / p95 recorded in
    test-artifacts/serve_load.json."""
    import httpx

    words = ["good", "bad", "the", "movie", "awful", "superb", "it", "was", "really", "nice", "boring"]

    def caller(seed: int) -> tuple[list[float], list[str]]:
        rng, latencies, errors = np.random.default_rng(seed), [], []
        with httpx.Client(timeout=60) as http:
            for _ in range(200):
                text = " ".join(rng.choice(words, rng.integers(2, 12)))
                start = time.perf_counter()
                try:
                    *_, table = call_api(http, demo["url"], "classify_text", [text, "", ["text/optimized"]])
                    assert table["data"][0][1] in ("negative", "positive"), table
                except Exception as err:  # counted, not raised: the test reports every failure at the end
                    errors.append(repr(err))
                latencies.append(time.perf_counter() - start)
        return latencies, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(caller, range(8)))
    wall = time.perf_counter() - start
    latencies = np.array([t for lat, _ in results for t in lat]) * 1000
    errors = [e for _, errs in results for e in errs]
    p50, p95 = (round(float(np.percentile(latencies, q)), 1) for q in (50, 95))
    report = {"clients": 8, "requests": int(latencies.size), "errors": len(errors), "wall_s": round(wall, 2),
              "requests_per_s": round(latencies.size / wall, 1), "p50_ms": p50, "p95_ms": p95,
              "max_ms": round(float(latencies.max()), 1)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"load test: {report}")
    assert not errors, f"{len(errors)} of 1600 requests failed, e.g. {errors[:3]}"
    assert latencies.size == 1600 and demo["proc"].poll() is None


# --- a real browser ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra has it)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_browser_types_text_presses_submit_and_reads_the_label(demo: dict, browser, serve_text_bundle: Path):
    page = browser.new_page(viewport={"width": 1200, "height": 1300})
    page.goto(demo["url"])
    page.fill("#text-input textarea", "the movie was good and nice")
    page.click("#classify-text")
    heading = page.locator("[data-testid='label-output-value']").first  # gr.Label's top class
    heading.wait_for(state="visible", timeout=30_000)
    want = runtime.load(serve_text_bundle).predict(["the movie was good and nice"])[0]
    page.wait_for_function("w => document.querySelector(\"[data-testid='label-output-value']\").innerText.trim() == w",
                           arg=want.label, timeout=30_000)
    assert page.get_by_text("text/optimized · ").count() >= 1  # the latency shown with the variant
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_text_classification.png"), full_page=True)
    page.close()


def test_browser_ticks_explain_and_sees_the_words_highlighted(demo: dict, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 1500})
    page.goto(demo["url"])
    page.fill("#text-input textarea", "the movie was good and nice")
    page.locator("#text-explain input[type=checkbox]").check()
    page.click("#classify-text")
    explanation = page.locator("#text-explanation")
    explanation.get_by_text("nice").first.wait_for(state="visible", timeout=30_000)
    assert page.get_by_text("occlusion toward").count() >= 1  # the label: variant, method, target, cost
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_text_explanation.png"), full_page=True)
    page.close()


def test_browser_draws_a_digit_on_the_sketchpad(demo: dict, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 1300})
    page.goto(demo["url"])
    page.get_by_role("tab", name="Image classification").click()
    page.get_by_role("button", name="Brush", exact=True).click()
    box = page.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y - 70)
    page.mouse.down()
    for step in range(15):
        page.mouse.move(x + step, y - 70 + step * 10)
    page.mouse.up()
    page.get_by_role("button", name="Classify the drawing").click()
    page.get_by_text("fp32 · ").first.wait_for(timeout=30_000)  # the label output, titled with its latency
    assert page.locator("[data-testid='label-output-value']").first.inner_text().strip() in ("cat", "dog", "fox")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_sketchpad.png"), full_page=True)
    page.close()


def test_browser_explains_a_drawing_with_a_heatmap(demo: dict, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 1500})
    page.goto(demo["url"])
    page.get_by_role("tab", name="Image classification").click()
    page.locator("#image-explain input[type=checkbox]").check()
    page.get_by_role("button", name="Brush", exact=True).click()
    box = page.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 40, y - 60)
    page.mouse.down()
    for step in range(12):
        page.mouse.move(x - 40 + step * 7, y - 60 + step * 10)
    page.mouse.up()
    page.get_by_role("button", name="Classify the drawing").click()
    page.locator("#image-explanation img").first.wait_for(state="visible", timeout=30_000)  # the heatmap overlay
    assert page.get_by_text("occlusion toward").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_sketch_explanation.png"), full_page=True)
    page.close()


def test_sketch_is_cropped_centred_and_matches_the_training_polarity():
    from serve.bundle.preprocessing import PreprocessingSpec

    canvas = np.zeros((280, 280, 4), dtype=np.uint8)
    canvas[20:120, 200:220] = (0, 0, 0, 255)  # a stroke in the top-right corner
    dark = PreprocessingSpec(size=(28, 28), color_mode="L", mean=(0.13,), std=(0.31,))  # MNIST: light ink on black
    image = np.asarray(sketch_to_image(canvas, dark))
    assert image.shape[0] == image.shape[1] and image.max() == 255 and image[0, 0] == 0
    rows, cols = np.nonzero(image)
    assert abs((rows.min() + rows.max()) / 2 - image.shape[0] / 2) <= 1  # centred
    assert abs((cols.min() + cols.max()) / 2 - image.shape[1] / 2) <= 1
    assert rows.min() >= 0.14 * image.shape[0]  # with a margin, as MNIST digits have
    light = PreprocessingSpec(size=(28, 28), color_mode="L", mean=(0.9,), std=(0.2,))  # dark ink on white
    assert np.array_equal(np.asarray(sketch_to_image(canvas, light)), 255 - image)
    opaque = np.full((50, 50, 3), 255, dtype=np.uint8)
    opaque[10:40, 20:25] = 0  # black strokes on an opaque white background: ink is darkness
    assert np.asarray(sketch_to_image(opaque, dark)).max() == 255
    assert sketch_to_image(np.zeros((50, 50, 4), dtype=np.uint8), dark) is None
