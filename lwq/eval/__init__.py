"""Evaluation: perplexity, zero-shot tasks, reports and plots."""
