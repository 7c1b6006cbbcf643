"""Inference: model loading (`load`), sampling (`sampling`), the batched engine (`engine`), and the
`lmforge generate` / `lmforge chat` commands (`generate`, `chat`)."""
