"""The parity gate: ONNX Runtime against PyTorch on the same real inputs, under stated tolerances.

An output element passes when |onnx - torch| <= atol + rtol * |torch| (numpy.allclose's rule; a NaN or inf where
PyTorch is finite fails). Reported alongside: the max abs diff and the max relative diff |onnx - torch| / |torch|
over elements with |torch| > atol (near zero a relative error means nothing). Top-1 agreement is the share of
positions where the graph's argmax equals PyTorch's; positions where PyTorch scores the graph's choice within the
tolerance of its own best are near-ties and count as agreeing. Causal-LM
decoders also have to produce the same greedy tokens as PyTorch `generate` over N steps. A failure raises
ParityError with the worst outputs; the caller writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compress.errors import ParityError, require

logger = logging.getLogger(__name__)


@dataclass
class ParityConfig:
    """Tolerances and input shapes of the gate. Defaults suit fp32 graphs (PyTorch and ORT differ by ~1e-6)."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1_agreement: float = 1.0
    batch_sizes: tuple[int, ...] = (1, 3)  # each at two sequence lengths: the shortest and the longest samples
    num_samples: int = 16  # real inputs drawn from the eval split (or given / built in)
    generate_steps: int = 8  # greedy tokens compared against PyTorch generate (causal-LM decoders)

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0 or not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ValueError("parity tolerances must be >= 0 and min_top1_agreement in [0, 1]")


@dataclass
class Case:
    """One set of graph inputs; `masks` (per output, broadcastable) limit the comparison to real positions."""

    name: str
    feeds: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Diff:
    case: str
    output: str
    max_abs: float
    max_rel: float
    excess: float  # the worst |d| - (atol + rtol |torch|); > 0 fails
    where: tuple[int, ...]
    got: float
    expected: float
    top1: float | None
    positions: int


def open_session(path: Any, *, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session (one thread by default: the gate checks numbers, not speed)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for invalid graphs
        raise ParityError(f"ONNX Runtime cannot load {path} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          "the graph is refused") from None


def check_graph(session: Any, reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], cases: list[Case],
                *, config: ParityConfig, label: str, reference_name: str = "PyTorch") -> dict[str, Any]:
    """Run every case through the session and the reference (PyTorch, or for int8 graphs the fp32 graph); return the
    parity record or raise."""
    output_names = [o.name for o in session.get_outputs()]
    input_names = {i.name for i in session.get_inputs()}
    diffs: list[_Diff] = []
    for case in cases:
        got = dict(zip(output_names, session.run(None, {k: v for k, v in case.feeds.items() if k in input_names}),
                       strict=True))
        expected = reference(case.feeds)
        for name, want in expected.items():
            if got[name].shape != want.shape:
                raise ParityError(f"{label}: output {name} has shape {list(got[name].shape)} where PyTorch gives "
                                  f"{list(want.shape)} [{case.name}]; it was not written")
            diffs.append(_compare(case, name, got[name], want, config))
    return _verdict(diffs, config, label, reference_name)


def _compare(case: Case, name: str, got: np.ndarray, want: np.ndarray, config: ParityConfig) -> _Diff:
    got, want = got.astype(np.float64), want.astype(np.float64)
    mask = np.broadcast_to(case.masks.get(name, np.ones((1,) * want.ndim, dtype=bool)), want.shape).astype(bool)
    finite = np.isfinite(got) & np.isfinite(want)
    abs_diff = np.where(finite, np.abs(got - want), np.inf)  # NaN/inf on either side fails, even NaN vs NaN
    abs_diff[~mask] = 0.0
    excess = np.where(mask, np.where(finite, abs_diff - (config.atol + config.rtol * np.abs(want)), np.inf), -np.inf)
    big = mask & (np.abs(want) > config.atol)  # relative error is meaningless near zero
    max_rel = float((abs_diff[big] / np.abs(want[big])).max()) if big.any() else 0.0
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape) if excess.size else ()
    top1, positions = _top1(got, want, mask, config) if name == "logits" and want.shape[-1] > 1 else (None, 0)
    return _Diff(case.name, name, float(abs_diff.max()) if abs_diff.size else 0.0, max_rel,
                 float(excess.max()) if excess.size else -np.inf, tuple(int(i) for i in worst),
                 float(got[worst]) if excess.size else np.nan, float(want[worst]) if excess.size else np.nan,
                 top1, positions)


def _top1(got: np.ndarray, want: np.ndarray, mask: np.ndarray, config: ParityConfig) -> tuple[float, int]:
    """Share of compared positions (all axes but the last) where the argmax agrees, near-ties excused."""
    keep = mask.reshape(-1, want.shape[-1]).any(axis=1)
    g, w = got.reshape(-1, want.shape[-1])[keep], want.reshape(-1, want.shape[-1])[keep]
    if not len(w):
        return 1.0, 0
    g_top, w_top = g.argmax(axis=1), w.argmax(axis=1)
    rows = np.arange(len(w))
    # Near-tie: PyTorch itself scores the graph's choice within tolerance of its own best.
    tie = w[rows, w_top] - w[rows, g_top] <= config.atol + config.rtol * np.abs(w[rows, w_top])
    return float(np.mean((g_top == w_top) | tie)), len(w)


def _verdict(diffs: list[_Diff], config: ParityConfig, label: str, reference_name: str) -> dict[str, Any]:
    top1 = [d.top1 for d in diffs if d.top1 is not None]
    record = {
        "passed": True, "atol": config.atol, "rtol": config.rtol, "min_top1_agreement": config.min_top1_agreement,
        "max_abs_diff": max(d.max_abs for d in diffs), "max_rel_diff": max(d.max_rel for d in diffs),
        "top1_agreement": min(top1) if top1 else None,
        "cases": [{"case": d.case, "output": d.output, "max_abs_diff": d.max_abs, "max_rel_diff": d.max_rel,
                   **({"top1_agreement": d.top1, "positions": d.positions} if d.top1 is not None else {})}
                  for d in diffs],
    }
    failed = [d for d in diffs if d.excess > 0 or (d.top1 is not None and d.top1 < config.min_top1_agreement)]
    if failed:
        failed.sort(key=lambda d: (d.excess, -(d.top1 if d.top1 is not None else 1.0)), reverse=True)
        ref = "torch" if reference_name == "PyTorch" else reference_name
        lines = [f"  {d.output} [{d.case}]: max abs diff {d.max_abs:.3g} (onnx {d.got:.6g} vs {ref} {d.expected:.6g} "
                 f"at {list(d.where)}), max rel diff {d.max_rel:.3g}"
                 + (f", top-1 agreement {d.top1:.1%} of {d.positions}" if d.top1 is not None else "")
                 for d in failed[:5]]
        raise ParityError(f"{label} does not match {reference_name} (atol {config.atol:g}, rtol {config.rtol:g}, "
                          f"top-1 >= {config.min_top1_agreement:.0%}); it was not written. Worst outputs:\n"
                          + "\n".join(lines))
    logger.info("%s parity: max abs diff %.3g, max rel diff %.3g", label, record["max_abs_diff"],
                record["max_rel_diff"])
    return record


def check_generation(decoder: Any, model: Any, prompts: list[dict[str, np.ndarray]], *, cache: dict[str, Any],
                     config: ParityConfig, eos_token_id: int | list[int] | None, pad_token_id: int,
                     label: str) -> dict[str, Any]:
    """Greedy tokens from the decoder graph (with its cache) == PyTorch `generate` greedy, for each prompt batch.

    A divergence is excused only at a near-tie (PyTorch's top two scores within tolerance at that step).
    """
    import torch
    from transformers import GenerationConfig

    from serve.bundle.decoding import greedy_generate

    # Pure greedy: a fresh config, so the run's own processors (repetition penalty...) do not apply.
    settings = GenerationConfig(max_new_tokens=config.generate_steps, do_sample=False, num_beams=1,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, output_scores=True,
                                return_dict_in_generate=True)
    results = []
    for batch in prompts:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.inference_mode():
            out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 generation_config=settings)
        want = out.sequences[:, ids.shape[1]:].numpy()
        scores = torch.stack(out.scores).float().numpy()  # [steps, batch, vocab]
        got, _ = greedy_generate(decoder, ids, mask, cache=cache, max_new_tokens=config.generate_steps,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        steps = min(got.shape[1], want.shape[1])
        mismatch = np.argwhere(got[:, :steps] != want[:, :steps])
        case = f"batch {ids.shape[0]} x prompt {ids.shape[1]}"
        if mismatch.size or got.shape != want.shape:
            row, step = (mismatch[np.argmin(mismatch[:, 1])] if mismatch.size else (0, steps))
            if step < steps:
                top2 = np.sort(scores[step, row])[-2:]
                if top2[1] - top2[0] <= config.atol + config.rtol * abs(top2[1]):
                    results.append({"case": case, "tokens": int(steps), "equal": True, "near_tie_at_step": int(step)})
                    continue
            raise ParityError(f"{label}: greedy tokens with the KV cache differ from PyTorch generate ({case}, "
                              f"sequence {row}, step {step}): onnx {got[row].tolist()} vs torch {want[row].tolist()}; "
                              "it was not written")
        results.append({"case": case, "tokens": int(steps), "equal": True})
    logger.info("%s: greedy tokens equal PyTorch generate for %d prompt batches", label, len(results))
    return {"steps": config.generate_steps, "cases": results}
