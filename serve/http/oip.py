"""Open Inference Protocol v2 (KServe v2, as Triton speaks it): tensors in, tensors out, for every bundle.

Tensors of each task (GET /v2/models/NAME lists them for a client):

    text classifiers   in:  text BYTES [N] (and text_pair BYTES [N] for pair models)
                       out: label BYTES [N], score FP32 [N] (the label's probability), probabilities FP32 [N, labels]
    text regression    in:  text BYTES [N];   out: value FP32 [N]
    image classifiers  in:  image BYTES [N] (encoded files; base64 in JSON),
                            or UINT8 [N, H, W, C] / [H, W, C] / [N, H, W]
                       out: label, score, probabilities as above
    causal LMs         in:  text_input BYTES [1] (parameters: max_tokens, temperature, top_p, seed, stop)
                       out: text_output BYTES [1]

Tensor data comes as JSON (`data`, flat in row-major order) or in the binary extension (Triton's: a JSON header of
`Inference-Header-Content-Length` bytes, then each input's raw bytes, `parameters.binary_data_size` long; BYTES
elements are each a 4-byte little-endian length and the bytes). Outputs come back as JSON, or binary when the request
asks (`binary_data_output`, or `binary_data` per output), which is what tritonclient asks by default.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np

from serve.bundle.tasks import Task
from serve.http.errors import APIError, bad_request
from serve.http.models import Classifier, Generator, ServedModel
from serve.predictors import Prediction

HEADER_LENGTH = "inference-header-content-length"
NUMPY_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
               "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
               "FP32": np.float32, "FP64": np.float64}


def model_metadata(model: ServedModel) -> dict[str, Any]:
    """GET /v2/models/NAME: name, versions, platform, and the input/output tensors clients send and get."""
    labels = len(model.labels) or -1
    if model.is_generator:
        inputs = [tensor("text_input", "BYTES", [1])]
        outputs = [tensor("text_output", "BYTES", [1])]
    elif isinstance(model, Classifier) and model.is_image:
        inputs = [tensor("image", "BYTES", [-1])]  # or UINT8 [N, H, W, C]
        outputs = [tensor("label", "BYTES", [-1]), tensor("score", "FP32", [-1]),
                   tensor("probabilities", "FP32", [-1, labels])]
    else:
        inputs = [tensor("text", "BYTES", [-1])]
        if isinstance(model, Classifier) and model.pair_column:
            inputs.append(tensor("text_pair", "BYTES", [-1]))
        outputs = ([tensor("value", "FP32", [-1])] if model.task == Task.TEXT_REGRESSION else
                   [tensor("label", "BYTES", [-1]), tensor("score", "FP32", [-1]),
                    tensor("probabilities", "FP32", [-1, labels])])
    return {"name": model.name, "versions": ["1"], "platform": "onnxruntime_onnx", "inputs": inputs,
            "outputs": outputs, "parameters": {"task": model.task, "variant": model.variant, "labels": model.labels}}


def tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request JSON, {input name: decoded tensor}) from an infer request body."""
    json_part, binary = body, b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad_request(f"Inference-Header-Content-Length is {header_length!r} but the body has {len(body)} "
                              "bytes")
        json_part, binary = body[:int(header_length)], body[int(header_length):]
    try:
        request = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON ({err})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise bad_request("an infer request is a JSON object with a non-empty 'inputs' list of tensors "
                          "({name, shape, datatype, data})")
    tensors: dict[str, Any] = {}
    offset = 0
    for i, item in enumerate(request["inputs"]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request(f"inputs[{i}] must be an object with a 'name'")
        name = item["name"]
        datatype, shape = item.get("datatype"), item.get("shape")
        if datatype != "BYTES" and datatype not in NUMPY_TYPES:
            raise bad_request(f"input {name!r} has datatype {datatype!r}; use BYTES, UINT8, FP32, ...")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad_request(f"input {name!r} needs a 'shape': a list of non-negative integers, got {shape!r}")
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise bad_request(f"input {name!r} declares binary_data_size {size!r}, but only "
                                  f"{len(binary) - offset} binary bytes are left in the body")
            raw, offset = binary[offset:offset + size], offset + size
            tensors[name] = decode_binary(name, datatype, shape, raw)
        else:
            tensors[name] = decode_json(name, datatype, shape, item.get("data"))
    return request, tensors


def decode_binary(name: str, datatype: str, shape: list[int], raw: bytes) -> Any:
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise bad_request(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
            (length,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + length > len(raw):
                raise bad_request(f"input {name!r}: a BYTES element says {length} bytes but the data ends first")
            items.append(raw[pos + 4:pos + 4 + length])
            pos += 4 + length
        if len(items) != count:
            raise bad_request(f"input {name!r} has shape {shape} ({count} elements) but {len(items)} BYTES elements")
        return items
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise bad_request(f"input {name!r} has shape {shape} of {datatype}: {count * dtype.itemsize} bytes expected, "
                          f"got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_json(name: str, datatype: str, shape: list[int], data: Any) -> Any:
    if not isinstance(data, list):
        raise bad_request(f"input {name!r} needs 'data' (a list) or binary data")
    flat = list(_flatten(data))
    count = int(np.prod(shape)) if shape else 1
    if len(flat) != count:
        raise bad_request(f"input {name!r} has shape {shape} ({count} elements) but {len(flat)} data elements")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise bad_request(f"input {name!r}: BYTES data in JSON are strings")
        return flat
    try:
        return np.array(flat, dtype=NUMPY_TYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError) as err:
        raise bad_request(f"input {name!r}: data are not {datatype} values ({err})") from None


def _flatten(data: list[Any]) -> Any:
    for x in data:
        if isinstance(x, list):
            yield from _flatten(x)
        else:
            yield x


def _base64(text: str) -> bytes:
    """An image file sent in JSON: BYTES elements there are strings, so files travel base64-encoded."""
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image data sent as JSON strings must be base64-encoded files (or send them in the "
                          "binary extension, as tritonclient does)", param="image") from None


def _texts(name: str, value: Any) -> list[str]:
    if isinstance(value, np.ndarray):
        raise bad_request(f"input {name!r} must be BYTES (UTF-8 text), got a numeric tensor")
    try:
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    except UnicodeDecodeError:
        raise bad_request(f"input {name!r} holds bytes that are not UTF-8 text") from None


def _one_input(tensors: dict[str, Any], expected: list[str]) -> None:
    unknown = sorted(set(tensors) - set(expected))
    missing = [n for n in expected[:1] if n not in tensors]
    if unknown or missing:
        raise bad_request(f"this model takes input(s) {', '.join(expected)}; got {', '.join(sorted(tensors))}")


async def infer(model: ServedModel, body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
    """POST /v2/models/NAME/infer: (response body, extra headers)."""
    request, tensors = parse_request(body, header_length)
    shapes = {i["name"]: i["shape"] for i in request["inputs"]}
    if isinstance(model, Generator):
        _one_input(tensors, ["text_input"])
        outputs = [("text_output", "BYTES", await _generate(model, tensors["text_input"], request))]
    elif isinstance(model, Classifier) and model.is_image:
        _one_input(tensors, ["image"])
        outputs = _prediction_outputs(model, await model.classify_images(_images(tensors["image"], shapes["image"])))
    else:
        assert isinstance(model, Classifier)
        _one_input(tensors, ["text", "text_pair"] if model.pair_column else ["text"])
        texts = _texts("text", tensors["text"])
        pairs = _texts("text_pair", tensors["text_pair"]) if "text_pair" in tensors else None
        outputs = _prediction_outputs(model, await model.classify_texts(texts, pairs))
    return encode_response(model, request, outputs)


def _images(value: Any, shape: list[int]) -> list[bytes] | np.ndarray:
    """BYTES tensors of encoded files, or a UINT8 batch [N, H, W(, C)] (a single [H, W, C] image is a batch of 1)."""
    if isinstance(value, list):
        return [v if isinstance(v, bytes) else _base64(v) for v in value]
    if value.dtype != np.uint8:
        raise bad_request(f"image arrays are UINT8 [N, H, W, C], [H, W, C] or [N, H, W]; got {value.dtype} "
                          f"shape {list(value.shape)}", param="image")
    if value.ndim == 3 and value.shape[-1] in (1, 3, 4):
        return value[None]
    if value.ndim not in (3, 4) or (value.ndim == 4 and value.shape[-1] not in (1, 3, 4)):
        raise bad_request(f"image arrays are UINT8 [N, H, W, C] (C = 1, 3 or 4), [H, W, C] or [N, H, W]; got shape "
                          f"{list(value.shape)}", param="image")
    return value


async def _generate(model: Generator, prompts: Any, request: dict[str, Any]) -> list[str]:
    texts = _texts("text_input", prompts)
    if len(texts) != 1:
        raise bad_request(f"text_input takes one prompt per request (shape [1]); got {len(texts)}")
    params = request.get("parameters") or {}
    known = {"max_tokens", "temperature", "top_p", "seed", "stop", "top_k", "repetition_penalty"}
    options = {k: v for k, v in params.items() if k in known}
    try:
        job = model.prepare(texts[0], max_tokens=options.pop("max_tokens", None), prompt_param="text_input",
                            **options)
    except TypeError as err:
        raise bad_request(f"generation parameters: {err}") from None
    model.admit()
    return ["".join([piece async for piece in model.run(job)])]


def _prediction_outputs(model: ServedModel, predictions: list[Prediction]) -> list[tuple[str, str, Any]]:
    if model.task == Task.TEXT_REGRESSION:
        return [("value", "FP32", np.array([p.value for p in predictions], np.float32))]
    probabilities = np.array([list(p.probabilities.values()) for p in predictions], np.float32)
    return [("label", "BYTES", [p.label for p in predictions]),
            ("score", "FP32", np.array([p.score for p in predictions], np.float32)),
            ("probabilities", "FP32", probabilities)]


def encode_response(model: ServedModel, request: dict[str, Any], outputs: list[tuple[str, str, Any]]
                    ) -> tuple[bytes, dict[str, str]]:
    """The response JSON (and binary tail) for the requested outputs (all when the request names none)."""
    wanted = request.get("outputs")
    binary_all = bool((request.get("parameters") or {}).get("binary_data_output"))
    by_name = {name: (datatype, value) for name, datatype, value in outputs}
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and "name" in o for o in wanted):
            raise bad_request("'outputs' is a list of {name, parameters}")
        unknown = [o["name"] for o in wanted if o["name"] not in by_name]
        if unknown:
            raise bad_request(f"unknown output(s) {unknown}; this model gives {', '.join(by_name)}")
        chosen = [(o["name"], bool((o.get("parameters") or {}).get("binary_data", binary_all))) for o in wanted]
    else:
        chosen = [(name, binary_all) for name in by_name]
    entries, tail = [], []
    for name, binary in chosen:
        datatype, value = by_name[name]
        shape = [len(value)] if isinstance(value, list) else list(value.shape)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            raw = (b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in value))
                   if datatype == "BYTES" else np.ascontiguousarray(value, dtype="<f4").tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = value if isinstance(value, list) else value.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": entries}
    if "id" in request:
        response["id"] = request["id"]
    header = json.dumps(response).encode()
    if not tail:
        return header, {"content-type": "application/json"}
    return header + b"".join(tail), {"content-type": "application/octet-stream",
                                     "inference-header-content-length": str(len(header))}


def check_version(version: str | None) -> None:
    if version is not None and version != "1":
        raise APIError(404, f"model version {version!r} is not served; this server has version 1 of each model")
