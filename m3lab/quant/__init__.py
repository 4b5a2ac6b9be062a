"""Quantization recipes, one module each (registered in `m3lab.registry.RECIPES`), and what they share
(`m3lab.quant.core`: the entry point, hub-layout rewrite, quant report)."""
