"""The HTTP server (serve.http) as a real uvicorn process on tiny bundles, called with real clients: tritonclient
(Open Inference Protocol v2), the official openai client, and plain requests for /v1/classify, errors and metrics."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import REPO
from http_helpers import API_KEY, AUTH, running_server
from PIL import Image

from serve import runtime

openai = pytest.importorskip("openai")
tritonhttp = pytest.importorskip("tritonclient.http")

LIMITS = ["--max-inputs", "8", "--max-body-bytes", "200000", "--max-tokens-cap", "64", "--max-text-chars", "2000",
          "--threads", "1"]
TEXTS = ["good", "the movie was really bad and boring", "it is nice", "superb item, lovely and perfect"]


@pytest.fixture(scope="module")
def bundles(serve_text_bundle: Path, serve_pair_bundle: Path, serve_image_bundle: Path, serve_lm_bundle: Path
            ) -> dict[str, Path]:
    return {"text": serve_text_bundle, "pair": serve_pair_bundle, "image": serve_image_bundle, "lm": serve_lm_bundle}


@pytest.fixture(scope="module")
def server(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """One server for the module: every kind of bundle, each under a name given with --name, and an API key."""
    names = [f"--name={name}={path}" for name, path in bundles.items()]
    log = tmp_path_factory.mktemp("http") / "server.log"
    with running_server([*names, "--api-key", API_KEY, *LIMITS], log) as url:
        yield url


@pytest.fixture(scope="module")
def triton(server: str):
    return tritonhttp.InferenceServerClient(server.removeprefix("http://"))


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def auth() -> dict[str, str]:
    """A fresh header dict per tritonclient call: tritonclient writes Inference-Header-Content-Length into the dict
    it is given, which would then go out with the next (JSON-only) request."""
    return dict(AUTH)


def png_bytes(rng: np.random.Generator, size: tuple[int, int] = (30, 26)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def post(server: str, route: str, body: object, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server}{route}", data=data, headers={**AUTH, **kwargs.pop("headers", {})}, timeout=30,
                         **kwargs)


def metric(server: str, name: str, **labels: str) -> float:
    """The value of one sample of GET /metrics (0 when absent)."""
    text = requests.get(f"{server}/metrics", headers=AUTH, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


# --- Open Inference Protocol v2, through tritonclient ---

def test_health_metadata_and_readiness_with_tritonclient(triton, bundles):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("text", headers=auth())
    meta = triton.get_model_metadata("text", headers=auth())
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "score", "probabilities"]
    assert meta["outputs"][2]["shape"] == [-1, 2]
    assert [i["name"] for i in triton.get_model_metadata("pair", headers=auth())["inputs"]] == ["text", "text_pair"]
    assert triton.get_model_metadata("lm", headers=auth())["outputs"][0]["name"] == "text_output"
    assert triton.get_server_metadata(headers=auth())["name"] == "tuneforge"
    with pytest.raises(Exception, match="not served"):
        triton.get_model_metadata("nope", headers=auth())


@pytest.mark.parametrize("binary", [True, False])
def test_text_infer_with_tritonclient_matches_the_runtime(triton, bundles, binary: bool):
    texts = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    tensor = tritonhttp.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(texts, binary_data=binary)
    outputs = [tritonhttp.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    result = triton.infer("text", [tensor], outputs=outputs, headers=auth())
    expected = runtime.load(bundles["text"]).predict(TEXTS)
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]  # JSON: str
    assert labels == [p.label for p in expected]
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               [list(p.probabilities.values()) for p in expected], atol=1e-5)
    # No outputs named: all of them, in binary (tritonclient's default)
    everything = triton.infer("text", [tensor], headers=auth())
    np.testing.assert_allclose(everything.as_numpy("score"), [p.score for p in expected], atol=1e-5)


def test_pair_infer_with_tritonclient(triton, bundles):
    pairs = ["it was", "the product", "so and but", "this"]
    inputs = []
    for name, values in (("text", TEXTS), ("text_pair", pairs)):
        tensor = tritonhttp.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_))
        inputs.append(tensor)
    result = triton.infer("pair", inputs, headers=auth())
    expected = runtime.load(bundles["pair"]).predict(TEXTS, pairs)
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               [list(p.probabilities.values()) for p in expected], atol=1e-5)


def test_image_infer_from_files_and_uint8_arrays(triton, bundles):
    rng = np.random.default_rng(0)
    files = [png_bytes(rng), png_bytes(rng, (12, 40))]
    arrays = rng.integers(0, 255, (3, 24, 20, 3), dtype=np.uint8)
    expected_files = runtime.load(bundles["image"]).predict(files)
    expected_arrays = runtime.load(bundles["image"]).predict(arrays)

    tensor = tritonhttp.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    result = triton.infer("image", [tensor], headers=auth())
    assert [x.decode() for x in result.as_numpy("label")] == [p.label for p in expected_files]
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               [list(p.probabilities.values()) for p in expected_files], atol=1e-5)

    for batch, rows in ((arrays, expected_arrays), (arrays[0], expected_arrays[:1])):  # [N,H,W,C] and [H,W,C]
        tensor = tritonhttp.InferInput("image", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        result = triton.infer("image", [tensor], headers=auth())
        np.testing.assert_allclose(result.as_numpy("probabilities"),
                                   [list(p.probabilities.values()) for p in rows], atol=1e-5)


def test_generation_through_the_inference_protocol(triton, bundles):
    tensor = tritonhttp.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(["The quick brown fox"], dtype=np.object_))
    result = triton.infer("lm", [tensor], parameters={"max_tokens": 8, "temperature": 0}, headers=auth())
    expected = runtime.load(bundles["lm"]).complete("The quick brown fox", max_new_tokens=8, do_sample=False)
    assert result.as_numpy("text_output")[0].decode() == expected


# --- the plain JSON route ---

def test_classify_route_for_texts_pairs_and_images(server, bundles):
    got = post(server, "/v1/classify", {"model": "text", "inputs": TEXTS})
    assert got.status_code == 200, got.text
    expected = runtime.load(bundles["text"]).predict(TEXTS)
    rows = got.json()["predictions"]
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert rows[0]["probabilities"].keys() == {"negative", "positive"}
    assert abs(rows[1]["score"] - expected[1].score) < 1e-5
    pairs = ["a", "b", "c", "d"]
    got = post(server, "/v1/classify", {"model": "pair", "inputs": TEXTS, "pairs": pairs}).json()
    assert [r["label"] for r in got["predictions"]] == [p.label for p in runtime.load(bundles["pair"]).predict(
        TEXTS, pairs)]
    image = png_bytes(np.random.default_rng(1))
    got = post(server, "/v1/classify", {"model": "image", "inputs": [base64.b64encode(image).decode()]})
    assert got.status_code == 200, got.text
    assert got.json()["predictions"][0]["label"] == runtime.load(bundles["image"]).predict([image])[0].label


def test_explain_route_gives_the_runtimes_attributions(server, bundles):
    from serve.explain import explain

    text = "a wonderful, moving film"
    got = post(server, "/v1/explain", {"model": "text", "input": text, "method": "shap", "samples": 16, "seed": 3})
    assert got.status_code == 200, got.text
    body = got.json()["explanation"]
    expected = explain(runtime.load(bundles["text"]), text, method="shap", samples=16, seed=3)
    assert [w["word"] for w in body["words"]] == expected.words
    assert np.allclose([w["attribution"] for w in body["words"]], expected.attributions, atol=1e-5)
    assert body["method"] == "shap" and body["model_calls"] == expected.model_calls and body["target"]
    image = base64.b64encode(png_bytes(np.random.default_rng(2))).decode()
    got = post(server, "/v1/explain", {"model": "image", "input": image, "method": "occlusion"})
    assert got.status_code == 200, got.text
    assert np.asarray(got.json()["explanation"]["attributions"]).shape == (24, 20)  # the model's input size
    for body, message in [({"model": "text", "input": text, "method": "rise"}, "method"),
                          ({"model": "text", "input": ""}, "empty"),
                          ({"model": "text", "input": text, "samples": 0}, "samples"),
                          ({"model": "text", "input": text, "baseline": "black"}, "do not apply"),
                          ({"model": "lm", "input": text}, "generates text")]:
        got = post(server, "/v1/explain", body)
        assert got.status_code == 400 and message in got.json()["error"]["message"], (body, got.text)
    assert post(server, "/v1/explain", {"model": "text", "input": text}).status_code == 200  # still answering


def test_concurrent_classify_requests_are_micro_batched_and_correct(server, bundles):
    expected = {t: p.label for t, p in zip(TEXTS, runtime.load(bundles["text"]).predict(TEXTS), strict=True)}
    batches_before = metric(server, "tuneforge_batch_size_count", model="text")
    results: list[tuple[str, str]] = []

    def call(text: str) -> None:
        for _ in range(4):
            got = post(server, "/v1/classify", {"model": "text", "inputs": [text]}).json()
            results.append((text, got["predictions"][0]["label"]))

    threads = [threading.Thread(target=call, args=(TEXTS[i % len(TEXTS)],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32 and all(label == expected[text] for text, label in results)
    batches = metric(server, "tuneforge_batch_size_count", model="text") - batches_before
    assert 1 <= batches <= 32
    assert metric(server, "tuneforge_batch_size_sum", model="text") >= 32


# --- OpenAI-compatible, through the openai client ---

def test_models_list(client):
    assert {m.id for m in client.models.list().data} == {"text", "pair", "image", "lm"}


def test_completions_greedy_match_the_runtime_streamed_or_not(client, bundles):
    expected = runtime.load(bundles["lm"]).complete("The quick brown fox", max_new_tokens=12, do_sample=False)
    done = client.completions.create(model="lm", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chunks = list(client.completions.create(model="lm", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason


def test_chat_completions_through_the_chat_template(client, bundles):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    generator = runtime.load(bundles["lm"])
    expected = generator.complete(messages, max_new_tokens=10, do_sample=False)
    done = client.chat.completions.create(model="lm", messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected
    assert done.usage.prompt_tokens == len(generator.prompt_ids(messages))
    stream = client.chat.completions.create(model="lm", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_sampling_repeats_with_a_seed_and_stop_strings_cut(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="lm", prompt="Every line", max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    assert sample(3) == sample(3)
    full = client.completions.create(model="lm", prompt="The", max_tokens=20, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="lm", prompt="The", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="lm", prompt="The", max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_openai_errors_have_openai_shape_and_status(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lm", prompt="x", n=2)
    assert err.value.body["param"] == "n" and "n=1" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="cap of 64"):
        client.completions.create(model="lm", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match=">= 1"):
        client.completions.create(model="lm", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="positions"):
        client.completions.create(model="lm", prompt="fox " * 200, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="classif"):
        client.completions.create(model="text", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    assert client.completions.create(model="lm", prompt="The", max_tokens=2).usage.completion_tokens <= 2


# --- bad input: a 4xx that names the problem, and the server keeps answering ---

BAD_REQUESTS = [
    # (route, body, extra headers, status, words of the message)
    ("/v1/classify", b'{"model": "text", "inputs": [', {}, 400, "not valid JSON"),
    ("/v1/classify", {"model": "nope", "inputs": ["a"]}, {}, 404, "not served"),
    ("/v1/classify", {"model": "text", "inputs": []}, {}, 400, "empty"),
    ("/v1/classify", {"model": "text", "inputs": ["a"] * 9}, {}, 400, "at most 8"),
    ("/v1/classify", {"model": "text", "inputs": "one text"}, {}, 400, "must be a list"),
    ("/v1/classify", {"model": "text", "inputs": [3]}, {}, 400, "not str"),
    ("/v1/classify", {"model": "text", "inputs": ["x" * 2001]}, {}, 400, "2,001 characters"),
    ("/v1/classify", {"model": "text", "inputs": ["a" * 100] * 8, "pad": "y" * 200_000}, {}, 413, "limit"),
    ("/v1/classify", {"model": "image", "inputs": [base64.b64encode(b"not an image").decode()]}, {}, 400,
     "not an image"),
    ("/v1/classify", {"model": "image", "inputs": ["%%%"]}, {}, 400, "base64"),
    ("/v1/classify", {"model": "text", "inputs": ["a"]}, {"Authorization": "Bearer nope"}, 401, "wrong API key"),
    ("/v2/models/text/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, {},
     400, "BYTES"),
    ("/v2/models/text/infer", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, {},
     400, "2 elements"),
    ("/v2/models/text/infer", {"inputs": [{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, {},
     400, "takes input"),
    ("/v2/models/text/infer", {"inputs": []}, {}, 400, "non-empty 'inputs'"),
    ("/v2/models/image/infer", {"inputs": [{"name": "image", "shape": [1, 4, 4, 3], "datatype": "FP32",
                                            "data": [0.5] * 48}]}, {}, 400, "UINT8"),
    ("/v2/models/image/infer", {"inputs": [{"name": "image", "shape": [1, 4, 4, 7], "datatype": "UINT8",
                                            "data": [1] * 112}]}, {}, 400, "C = 1, 3 or 4"),
    ("/v2/models/nope/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, {},
     404, "not served"),
    ("/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": "many"}, {}, 400, "max_tokens"),
    ("/v1/completions", {"model": "lm", "prompt": "x", "temperature": -1}, {}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "lm", "messages": []}, {}, 400, "messages"),
    ("/v1/chat/completions", {"model": "lm", "messages": [{"role": "robot", "content": "x"}]}, {}, 400, "role"),
    ("/v1/nothing", {}, {}, 404, "no route"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda c: f"{c[0]}-{c[3]}-{c[4][:12]}")
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_answering(server, case):
    route, body, headers, status, words = case
    got = post(server, route, body, headers=headers)
    assert got.status_code == status, got.text
    error = got.json()["error"]
    message = error if route.startswith("/v2") else error["message"]
    assert words in message, message
    if not route.startswith("/v2"):
        assert set(error) == {"message", "type", "param", "code"}
    good = post(server, "/v1/classify", {"model": "text", "inputs": ["good"]})
    assert good.status_code == 200 and good.json()["predictions"][0]["label"]


def test_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    got = requests.post(f"{server}/v1/classify", data=chunks(), headers=AUTH, timeout=30)
    assert got.status_code == 413
    assert post(server, "/v1/classify", {"model": "text", "inputs": ["good"]}).status_code == 200


def test_api_key_on_every_route_but_health(server):
    assert requests.get(f"{server}/v2/health/live", timeout=5).status_code == 200
    for route in ("/v1/models", "/metrics", "/v2/models/text"):
        got = requests.get(f"{server}{route}", timeout=5)
        assert got.status_code == 401 and "Bearer" in got.text, route
        assert requests.get(f"{server}{route}", headers=AUTH, timeout=5).status_code == 200


def test_metrics_count_requests_errors_latency_and_tokens(server, client):
    before = metric(server, "tuneforge_generated_tokens_total", model="lm")
    client.completions.create(model="lm", prompt="The", max_tokens=5, temperature=0)
    post(server, "/v1/classify", {"model": "text", "inputs": []})
    assert metric(server, "tuneforge_generated_tokens_total", model="lm") - before >= 1
    assert metric(server, "tuneforge_requests_total", model="lm", route="/v1/completions", status="200") >= 1
    assert metric(server, "tuneforge_request_errors_total", model="text", route="/v1/classify", status="400") >= 1
    assert metric(server, "tuneforge_request_seconds_count", model="text", route="/v1/classify") >= 1
    assert metric(server, "tuneforge_time_to_first_token_seconds_count", model="lm") >= 1
    assert metric(server, "tuneforge_prompt_tokens_total", model="lm") >= 1
    text = requests.get(f"{server}/metrics", headers=AUTH, timeout=5).text
    assert "tuneforge_queue_depth" in text and "tuneforge_batch_size_bucket" in text


# --- concurrency: a full queue answers 503, a client that leaves stops its generation ---

def test_full_queue_gets_503_and_a_disconnect_stops_the_generation(serve_lm_bundle: Path, tmp_path: Path):
    args = [f"--name=lm={serve_lm_bundle}", "--max-concurrent-generations", "1", "--max-queue", "1", "--threads", "1"]
    with running_server(args, tmp_path / "slow.log", slow=True) as url:
        stream = requests.post(f"{url}/v1/completions", json={"model": "lm", "prompt": "The", "max_tokens": 120,
                                                               "temperature": 0, "stream": True},
                               stream=True, timeout=30)
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith(b"data: ")  # the stream runs and holds the only generation slot
        waiting: list[requests.Response] = []
        second = threading.Thread(target=lambda: waiting.append(requests.post(
            f"{url}/v1/completions", json={"model": "lm", "prompt": "The", "max_tokens": 2}, timeout=30)))
        second.start()
        deadline = time.monotonic() + 10  # until the second request waits for the slot: the queue (1) is full
        while metric(url, "tuneforge_queue_depth", model="lm") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        third = requests.post(f"{url}/v1/completions", json={"model": "lm", "prompt": "The", "max_tokens": 2},
                              timeout=30)
        assert third.status_code == 503 and third.headers["Retry-After"] == "1"
        assert third.json()["error"]["code"] == "queue_full"
        stream.close()  # the client goes away mid-stream
        second.join(timeout=20)
        assert waiting and waiting[0].status_code == 200  # it got the slot the stream gave back
        deadline = time.monotonic() + 10
        while metric(url, "tuneforge_generations_cancelled_total", model="lm") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(url, "tuneforge_generations_cancelled_total", model="lm") == 1
        generated = metric(url, "tuneforge_generated_tokens_total", model="lm")
        assert generated < 120 + 2  # the stream's 120 were not all made (the second request made 2)
        assert metric(url, "tuneforge_running", model="lm") == 0
        assert metric(url, "tuneforge_rejected_total", model="lm") == 1


# --- packaging ---

def test_server_never_imports_torch(serve_text_bundle: Path, serve_lm_bundle: Path):
    from test_imports import modules_after, top_level

    code = (f"from serve.http.app import create_app\nfrom serve.http.config import ServerConfig, model_specs\n"
            f"import serve.http.cli\n"
            f"create_app(ServerConfig(models=model_specs([{str(serve_text_bundle)!r}, {str(serve_lm_bundle)!r}])))")
    loaded = top_level(modules_after(code))
    assert {"fastapi", "prometheus_client", "onnxruntime"} <= loaded
    for heavy in ("torch", "transformers", "datasets", "gradio"):
        assert heavy not in loaded, f"the HTTP server imported {heavy}"


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["tuneforge-serve"] == "serve.http.cli:main"
    server = " ".join(project["optional-dependencies"]["server"])
    assert all(name in server for name in ("fastapi", "uvicorn", "prometheus-client"))
    assert not any("fastapi" in d or "ray" in d for d in project["dependencies"])


def test_demo_is_mounted_at_demo_behind_the_api_key_login(serve_text_bundle: Path, tmp_path: Path):
    pytest.importorskip("gradio")
    from gradio_client import Client

    with running_server([f"--name=text={serve_text_bundle}", "--demo", "--api-key", API_KEY, "--threads", "1"],
                        tmp_path / "demo.log") as url:
        assert requests.get(f"{url}/demo/", timeout=30).status_code == 200  # the login page
        assert requests.get(f"{url}/demo/config", timeout=30).status_code == 401  # the app itself needs the login
        api = Client(f"{url}/demo/", auth=("any", API_KEY), verbose=False)
        *_, table = api.predict("good", "", ["optimized"], api_name="/classify_text")
        want = runtime.load(serve_text_bundle).predict(["good"])[0]
        assert table["data"][0][1] == want.label
        assert post(url, "/v1/classify", {"model": "text", "inputs": ["good"]}).json()["predictions"][0]["label"] == \
            want.label


# --- pieces without a server ---

def test_model_names_come_from_folders_and_name_overrides(tmp_path: Path):
    from serve.errors import ServeError
    from serve.http.config import ServerConfig, model_specs

    a, b = tmp_path / "reviews", tmp_path / "other"
    specs = model_specs([str(a), str(b)], [f"sentiment={a}", f"extra={tmp_path / 'x'}"], variant="fp32")
    assert [(s.name, s.variant) for s in specs] == [("sentiment", "fp32"), ("other", "fp32"), ("extra", "fp32")]
    config = ServerConfig(models=specs, api_key="k")
    assert ServerConfig.from_json(config.to_json()) == config
    with pytest.raises(ServeError, match="NAME=BUNDLE"):
        model_specs([], ["no-equals-sign"])
    with pytest.raises(ServeError, match="used in URLs"):
        model_specs([], [f"a/b={a}"])
    with pytest.raises(ServeError, match="--name"):
        ServerConfig(models=model_specs([str(a), str(tmp_path / "x" / "reviews")]))
    with pytest.raises(ServeError, match="nothing to serve"):
        ServerConfig(models=())


def test_stop_strings_are_cut_and_their_beginnings_held_back():
    from serve.http.models import split_stop

    assert split_stop("hello wor", ["world"]) == ("hello ", "wor", False)  # may become the stop string
    assert split_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert split_stop("abc", []) == ("abc", "", False)
    assert split_stop("hello wor", ["world"], final=True) == ("hello wor", "", False)
    assert split_stop("x END y STOP", ["STOP", "END"]) == ("x ", "", True)  # the earliest one
