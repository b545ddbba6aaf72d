"""Causal LMs: data (text blocks, instructions), models, LoRA, sampling."""
