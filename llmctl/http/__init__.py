"""The HTTP gateway (``llmctl serve-http``): the OpenAI and Ollama APIs over llmosd's socket.

The gateway is an ordinary client of the daemon (one pooled ``llmctl.Client`` per request or
stream), so the daemon's security boundary stays its socket and the gateway acts with the
rights of the user who runs it.

- ``fields``: checking JSON request fields; the HTTP status of every ``LlmosdError`` (pure);
- ``openai`` / ``ollama``: the pure translations, HTTP body -> daemon call and daemon replies
  -> HTTP body (table-tested in tests/unit/test_i15_translate.py);
- ``bridge``: pooled ``Client``s (blocking calls on threads), and streams read on the event loop
  only when the HTTP side asks (no read-ahead: a slow HTTP reader holds back the daemon's credits);
- ``app``: the ASGI application (Starlette): routes, API keys, body limits, SSE/NDJSON.

Only ``app`` and ``bridge`` need the ``http`` extra (``pip install llmosd[http]``).
"""
