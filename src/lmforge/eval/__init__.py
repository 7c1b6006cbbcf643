"""Evaluation: perplexity / bits per byte (`perplexity`), JSONL tasks (`tasks`), the lm-eval adapter
(`harness`) and the `lmforge eval` command (`run`)."""
