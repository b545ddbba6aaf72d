"""The peer of bench/http_serving.py: a FastAPI + onnxruntime classification endpoint written the way a user would by
hand (one module-level session with default options, a sync route that FastAPI runs on its thread pool, the request
tokenized and run as one batch). Same request and response shape as tuneforge's /v1/classify.

    python -m uvicorn --app-dir bench http_peer:app --port 8001     # with TUNEFORGE_PEER_BUNDLE=BUNDLE and
                                                                    # TUNEFORGE_PEER_VARIANT=int8-dynamic
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel
from tokenizers import Tokenizer

bundle = Path(os.environ["TUNEFORGE_PEER_BUNDLE"])
manifest = json.loads((bundle / "manifest.json").read_text())
variant = os.environ.get("TUNEFORGE_PEER_VARIANT") or manifest["default_variant"]
session = ort.InferenceSession(str(bundle / manifest["variants"][variant]["graphs"]["model"]["file"]),
                               providers=["CPUExecutionProvider"])
input_names = {i.name for i in session.get_inputs()}
tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))  # padding and truncation are set in the file
labels = manifest["labels"]
app = FastAPI()


class ClassifyRequest(BaseModel):
    model: str
    inputs: list[str]


@app.post("/v1/classify")
def classify(request: ClassifyRequest) -> dict:
    encodings = tokenizer.encode_batch(request.inputs)
    feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
             "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
    logits = session.run(None, {k: v for k, v in feeds.items() if k in input_names})[0]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return {"model": request.model, "predictions": [
        {"label": labels[int(p.argmax())], "score": float(p.max()),
         "probabilities": {name: float(x) for name, x in zip(labels, p, strict=True)}} for p in probs]}
