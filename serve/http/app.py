"""create_app(config) -> FastAPI: the server's routes over the loaded bundles.

    GET  /v2/health/live, /v2/health/ready           probes (never need the API key)
    GET  /v2, /v2/models/NAME, /v2/models/NAME/ready  Open Inference Protocol metadata
    POST /v2/models/NAME/infer                        Open Inference Protocol inference (serve.http.oip)
    POST /v1/classify                                 {"model", "inputs": [texts or base64 images], "pairs"?}
    GET  /v1/models                                   every served model, in OpenAI's list shape
    POST /v1/completions, /v1/chat/completions        OpenAI-compatible generation (serve.http.openai_api)
    GET  /metrics                                     Prometheus text format
    /demo                                             the Gradio demo, with --demo

Models load when the app is made (errors surface before the port opens); the app is then served by uvicorn
(serve.http.cli) or by Ray Serve replicas (serve.ray), each of which makes its own.
"""

from __future__ import annotations

import base64
import binascii
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.bundle.tasks import Task
from serve.http import oip
from serve.http import openai_api as oa
from serve.http.config import ServerConfig
from serve.http.errors import APIError, bad_request, error_body, json_object, not_found
from serve.http.metrics import Metrics
from serve.http.middleware import ServerMiddleware
from serve.http.models import Classifier, Generator, ServedModel, load_models

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `config.models` under `config.limits` (see the module docstring for routes)."""
    metrics = Metrics()
    models = load_models(config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        for model in models.values():
            model.close()

    app = FastAPI(title="tuneforge inference server", version=VERSION, lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    app.state.models, app.state.metrics, app.state.config = models, metrics, config
    _add_error_handlers(app)
    _add_routes(app, models, metrics)
    if config.demo:
        _mount_demo(app, config)
    app.add_middleware(ServerMiddleware, api_key=config.api_key, max_body_bytes=config.limits.max_body_bytes,
                       metrics=metrics)
    return app


def _lookup(models: dict[str, ServedModel], name: Any, request: Request) -> ServedModel:
    if not isinstance(name, str) or not name:
        raise bad_request("name the model: 'model' is a required string", param="model")
    model = models.get(name)
    if model is None:
        raise not_found(name, list(models))
    request.state.model = name  # the metrics' model label
    return model


def _add_routes(app: FastAPI, models: dict[str, ServedModel], metrics: Metrics) -> None:
    # --- health and metadata (Open Inference Protocol) ---

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}  # models load before the app exists: serving means ready

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "tuneforge", "version": VERSION, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
        oip.check_version(version)
        return oip.model_metadata(_lookup(models, name, request))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
        oip.check_version(version)
        return {"name": _lookup(models, name, request).name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        oip.check_version(version)
        model = _lookup(models, name, request)
        body, headers = await oip.infer(model, await request.body(), request.headers.get(oip.HEADER_LENGTH))
        return Response(body, headers=headers)

    # --- plain JSON ---

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        data = json_object(await request.body())
        model = _lookup(models, data.get("model"), request)
        if not isinstance(model, Classifier):
            raise bad_request(f"model {model.name!r} generates text; use /v1/completions or /v1/chat/completions",
                              param="model")
        inputs, pairs = data.get("inputs"), data.get("pairs")
        if not isinstance(inputs, list):
            raise bad_request("'inputs' must be a list: texts, or base64-encoded image files", param="inputs")
        if pairs is not None and not isinstance(pairs, list):
            raise bad_request("'pairs' must be a list of texts, one per input", param="pairs")
        if model.is_image:
            predictions = await model.classify_images([_image_bytes(i, x) for i, x in enumerate(inputs)])
        else:
            predictions = await model.classify_texts(inputs, pairs)
        if model.task == Task.TEXT_REGRESSION:
            rows = [{"value": p.value, "truncated": p.truncated} for p in predictions]
        else:
            rows = [{"label": p.label, "score": p.score, "probabilities": p.probabilities, "truncated": p.truncated}
                    for p in predictions]
        return JSONResponse({"model": model.name, "predictions": rows})  # no jsonable_encoder pass: plain types

    @app.post("/v1/explain")
    async def explain(request: Request) -> JSONResponse:
        """Attributions of one input's prediction: words (text) or pixels (images), see serve.explain."""
        data = json_object(await request.body())
        model = _lookup(models, data.get("model"), request)
        if not isinstance(model, Classifier):
            raise bad_request(f"model {model.name!r} generates text; explanations are for classifiers", param="model")
        settings = {k: data[k] for k in EXPLAIN_SETTINGS if data.get(k) is not None}
        for key in ("samples", "seed"):
            if key in settings and (not isinstance(settings[key], int) or isinstance(settings[key], bool)):
                raise bad_request(f"'{key}' must be an integer", param=key)
        if model.is_image:
            unknown = {"pair", "replacement"} & settings.keys()
            given = _image_bytes(0, data.get("input"))
        else:
            unknown = {"baseline"} & settings.keys()
            given = data.get("input")
        if unknown:
            raise bad_request(f"{', '.join(sorted(unknown))} do not apply to model {model.name!r}", param=min(unknown))
        return JSONResponse({"model": model.name, "explanation": await model.explain(given, **settings)})

    # --- OpenAI-compatible ---

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [oa.model_card(m.name, m.created, m.task) for m in models.values()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        model = _lookup(models, name, request)
        return oa.model_card(model.name, model.created, model.task)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = oa.parse(oa.CompletionRequest, await request.body())
        model = _generator(models, body.model, request)
        return await _generate(model, oa.completion_job(model, body), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = oa.parse(oa.ChatRequest, await request.body())
        model = _generator(models, body.model, request)
        return await _generate(model, oa.chat_job(model, body), body, chat=True)

    # --- operations ---

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)


def _generator(models: dict[str, ServedModel], name: str, request: Request) -> Generator:
    model = _lookup(models, name, request)
    if not isinstance(model, Generator):
        raise bad_request(f"model {model.name!r} is a {model.task} model; classify with /v1/classify or "
                          f"/v2/models/{model.name}/infer", param="model", code="model_not_generative")
    return model


async def _generate(model: Generator, job: oa.GenerationJob, body: oa.SamplingRequest, *, chat: bool) -> Response:
    model.admit()  # 503 here, before any response starts
    if not body.stream:
        return JSONResponse(await oa.complete(model, job, chat=chat))
    # Start generating before answering 200, so an error of the first step is still an HTTP error.
    pieces = model.run(job)
    try:
        first: str | None = await anext(pieces)
    except StopAsyncIteration:
        first = None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(oa.stream(model, job, first, pieces, chat=chat, include_usage=include_usage),
                             media_type="text/event-stream", headers=oa.SSE_HEADERS)


# The explain route's optional settings (serve.explain.explain's keyword arguments).
EXPLAIN_SETTINGS = ("method", "target", "samples", "seed", "pair", "replacement", "baseline")


def _image_bytes(index: int, value: Any) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"inputs[{index}] must be a base64-encoded image file (a string), got "
                          f"{type(value).__name__}", param="inputs")
    try:
        return base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"inputs[{index}] is not valid base64; encode the image file's bytes",
                          param="inputs") from None


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, error: APIError) -> JSONResponse:
        headers = dict(error.headers)
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error_body(request.url.path, error), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return respond(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}; see /docs" if error.status_code in (404, 405) \
            else str(error.detail)
        return respond(request, APIError(error.status_code, message, code="not_found"
                                         if error.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return respond(request, APIError(500, f"internal error ({type(error).__name__}); the server log has the "
                                         "details", type="server_error"))



def _mount_demo(app: FastAPI, config: ServerConfig) -> None:
    """The Gradio demo on the same bundles at /demo; behind a login whose password is the API key, if one is set."""
    import hmac

    import gradio as gr

    from serve.app import build_demo

    demo = build_demo([m.path for m in config.models], threads=config.threads)
    auth = None
    if config.api_key:
        key = config.api_key

        def auth(user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), key.encode())

    gr.mount_gradio_app(app, demo, path="/demo", auth=auth, ssr_mode=False)
