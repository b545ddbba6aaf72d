"""Embedded causal LMs shipped as GGUF (SmolLM2): converted once into a plain safetensors folder."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from serve.bundle.folders import move_into_place, remove_temp

logger = logging.getLogger(__name__)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF causal LM to float32 and write it, with its tokenizer, as a plain safetensors folder.

    Written to a temp folder and renamed into place, so a killed conversion leaves nothing that looks complete;
    when several processes convert at once, the first rename wins and the others discard their copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    logger.info("converting %s to safetensors in %s (once; about a minute)", gguf_file.name, out_dir)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model refuses save_pretrained (its config carries the GGUF quantization); rebuild a plain one.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            move_into_place(tmp, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        remove_temp(tmp)
    return out_dir
