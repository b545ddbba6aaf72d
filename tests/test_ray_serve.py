"""serve.ray: the HTTP server's app on a local Ray Serve (2 CPUs, 2 replicas of a tiny bundle), called through
Ray's HTTP proxy with tritonclient and the openai client, then shut down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import REPO
from http_helpers import API_KEY, AUTH, free_port

from serve import runtime
from serve.http.config import Limits, ServerConfig, model_specs

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
tritonhttp = pytest.importorskip("tritonclient.http")


def test_two_replicas_on_a_local_ray_answer_both_clients(serve_text_bundle: Path, serve_lm_bundle: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    from ray import serve as ray_serve

    from serve.ray import APP_NAME, run

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the replicas import serve.http from this checkout
    config = ServerConfig(models=model_specs([], [f"text={serve_text_bundle}", f"lm={serve_lm_bundle}"]),
                          limits=Limits(max_tokens_cap=32), api_key=API_KEY, threads=1)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                                                            "OMP_NUM_THREADS": "1"}})
    try:
        run(config.to_json(), port=port, replicas=2, num_cpus=0.5)
        status = ray_serve.status().applications[APP_NAME].deployments[APP_NAME]
        assert status.replica_states.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401  # the same app, API key included

        triton = tritonhttp.InferenceServerClient(f"127.0.0.1:{port}")
        texts = ["good", "the movie was really bad", "it is nice"]
        expected = runtime.load(serve_text_bundle).predict(texts)
        for _ in range(4):  # several calls, spread over both replicas by Ray's proxy
            tensor = tritonhttp.InferInput("text", [3], "BYTES")
            tensor.set_data_from_numpy(np.array(texts, dtype=np.object_))
            result = triton.infer("text", [tensor], headers=dict(AUTH))
            np.testing.assert_allclose(result.as_numpy("probabilities"),
                                       [list(p.probabilities.values()) for p in expected], atol=1e-5)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        want = runtime.load(serve_lm_bundle).complete("The quick", max_new_tokens=6, do_sample=False)
        done = client.completions.create(model="lm", prompt="The quick", max_tokens=6, temperature=0)
        assert done.choices[0].text == want
        chunks = list(client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError, match="cap of 32"):
            client.completions.create(model="lm", prompt="x", max_tokens=33)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def test_ray_serve_batch_option_answers_as_the_runtime(serve_text_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    """--ray-batch-max-size: classifier requests batched by Ray's @serve.batch in the replica (concurrent requests
    grouped into model runs), the same answers as the runtime's."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve as ray_serve

    from serve.ray import run

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    config = ServerConfig(models=model_specs([], [f"text={serve_text_bundle}"]), threads=1)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                                                            "OMP_NUM_THREADS": "1"}})
    try:
        run(config.to_json(), port=port, replicas=1, num_cpus=0.5, ray_batch=(8, 20.0))
        url = f"http://127.0.0.1:{port}/v1/classify"
        texts = ["good", "the movie was really bad", "it is nice", "awful", "fine", "a long and dull film"]
        predictor = runtime.load(serve_text_bundle)
        expected = [predictor.predict([t])[0] for t in texts]

        def classify(inputs: list) -> requests.Response:
            return requests.post(url, json={"model": "text", "inputs": inputs}, timeout=30)

        with ThreadPoolExecutor(len(texts)) as pool:  # concurrent, so the 20 ms wait groups them
            answers = list(pool.map(classify, [[t] for t in texts] * 2))
        for answer, want in zip(answers, expected * 2, strict=True):
            assert answer.status_code == 200, answer.text
            got = answer.json()["predictions"][0]
            assert got["label"] == want.label
            np.testing.assert_allclose(list(got["probabilities"].values()), list(want.probabilities.values()),
                                       atol=1e-5)
        with ThreadPoolExecutor(3) as pool:  # a bad input is refused (400), the others beside it answered
            bad, *good = pool.map(classify, [[7], ["good"], ["awful"]])
        assert bad.status_code == 400 and all(g.status_code == 200 for g in good)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def test_a_batch_of_requests_splits_back_and_a_failing_one_fails_alone():
    """serve.ray.run_requests (what the @serve.batch function runs): one model run for several requests, each gets its
    own rows' results; when the batch fails, each request runs alone and only the bad one gets its exception."""
    from serve.ray import run_requests

    runs: list[list[str]] = []

    def run_batch(rows: list[str]) -> list[str]:
        runs.append(list(rows))
        if "bad" in rows:
            raise ValueError("bad row")
        return [row.upper() for row in rows]

    assert run_requests(run_batch, [["a", "b"], ["c"]]) == [["A", "B"], ["C"]]
    first, failed, last = run_requests(run_batch, [["a", "b"], ["bad"], ["c"]])
    assert first == ["A", "B"] and last == ["C"] and isinstance(failed, ValueError)
    assert runs == [["a", "b", "c"], ["a", "b", "bad", "c"], ["a", "b"], ["bad"], ["c"]]


def test_serve_config_builder_takes_the_command_line_options(serve_text_bundle: Path):
    from ray.serve import Application

    from serve.ray import app_builder

    app = app_builder({"argv": [f"--name=text={serve_text_bundle}", "--threads", "1", "--max-queue", "8"]})
    assert isinstance(app, Application)
    batched = app_builder({"argv": [f"--name=text={serve_text_bundle}"], "ray_batch_max_size": 8,
                           "ray_batch_wait_ms": 5})
    assert isinstance(batched, Application)


def test_ray_command_line_help():
    proc = subprocess.run([sys.executable, "-m", "serve.ray", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "--replicas" in proc.stdout and "--max-replicas" in proc.stdout and "--api-key" in proc.stdout
    assert "--ray-batch-max-size" in proc.stdout
