"""The OpenAI-compatible HTTP API (FastAPI), over any EngineClient: the local engine process
(`serve`) today, remote prefill/decode workers behind the router later."""
