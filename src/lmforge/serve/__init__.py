"""`lmforge serve`: an OpenAI-compatible HTTP server with API keys, limits, batching and a chat page.

    lmforge serve runs/demo/pretrain port=8000

Modules: `app` (routes, the CLI, the server), `auth` (API keys), `limits` (rate limits, body cap),
`filters` (output wordlist), `batcher` (the engine's worker thread), `static/` (the chat page).
"""
