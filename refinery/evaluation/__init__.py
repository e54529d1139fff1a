"""Evaluation: held-out loss/perplexity and generation, per-task SFT scores, text metrics."""
