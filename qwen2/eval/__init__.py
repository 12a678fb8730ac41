"""Evaluation tasks (perplexity so far)."""
