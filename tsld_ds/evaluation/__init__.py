"""Evaluating a trained or converted model outside training: perplexity (training's method) and,
with lm-eval installed, its tasks."""
