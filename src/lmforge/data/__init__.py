"""Data stages: ingest, curate, deduplicate, mask PII, decontaminate, tokenize, verify."""
