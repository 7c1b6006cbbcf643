"""`lmforge serve`: an OpenAI-compatible HTTP server with API keys, limits, batching and a chat page.

    lmforge serve runs/demo/pretrain port=8000

Modules: `app` (the app factory and the CLI), `protocol` (request/response schemas, error bodies),
`state` (the config and the request -> prompts + sampling checks), `edge` (keys, error shape, headers,
logs, the chat page), `routes` (the endpoints and a completion's life), `embeddings` (/v1/embeddings),
`audit_trail` (the server's audit records), `auth` (API keys), `limits` (rate limits, body cap),
`filters` (output wordlist), `batcher` (the engine's worker thread), `guard` (Host allowlist, Origin
check, JSON content type), `timeouts` (request head/body read deadlines in uvicorn's h11 protocol),
`static/` (the chat page).
"""
