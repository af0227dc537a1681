"""The FastAPI app: routes, the API-key check, error handlers. Built by `build_app` from an
engine client, a tokenizer and the served model; everything it holds lives on app.state."""

from __future__ import annotations

import hashlib
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tandem.services.openai.chat import create_chat_completion
from tandem.services.openai.completions import create_completion
from tandem.services.openai.engine_client import EngineClient
from tandem.services.openai.errors import APIError, error_response, install_error_handlers
from tandem.services.openai.metrics import ServerMetrics
from tandem.services.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from tandem.services.openai.serving import ClientDisconnected, OpenAIServing, ServedModel


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/*; keys compare in constant time."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            response = error_response(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`).",
                                      code="invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(digest, self._digest) and scheme.lower() == b"bearer"


MAX_BODY_BYTES = 32 << 20  # a request body larger than this is refused with 413 before it is parsed


class BodySizeLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, or as soon as a chunked body
    passes the limit (the rest is not read into memory)."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        too_large = refused = False

        async def limited_receive():
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # stop reading; whatever the app answers becomes the 413
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message) -> None:
            nonlocal refused
            if not too_large:
                await send(message)
            elif not refused:
                refused = True
                await self._refuse(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, scope, receive, send) -> None:
        response = error_response(413, f"the request body is larger than {self.max_bytes >> 20} MiB",
                                  code="request_too_large")
        await response(scope, receive, send)


def build_app(client: EngineClient, tokenizer, model: ServedModel, *, api_key: str | None = None,
              version: str = "0", metrics: ServerMetrics | None = None, lifespan=None) -> FastAPI:
    """`lifespan` (optional) wraps the app's life: the serve process starts and stops the
    engine client there."""

    @asynccontextmanager
    async def _lifespan(app: FastAPI):
        if lifespan is None:
            yield
        else:
            async with lifespan(app):
                yield

    app = FastAPI(title="Tandem", version=version, lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.serving = OpenAIServing(client, tokenizer, model)
    app.state.metrics = metrics or ServerMetrics(model.names[0])
    app.state.created = int(time.time())
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware)  # outermost: before the key check reads nothing anyway

    def serving_of(request: Request) -> OpenAIServing:
        serving: OpenAIServing = request.app.state.serving
        if serving.client.dead_reason is not None:
            raise APIError(503, serving.client.dead_reason, code="engine_dead")
        return serving

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        try:
            return await create_completion(serving_of(request), req, request)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        try:
            return await create_chat_completion(serving_of(request), req, request)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        m = request.app.state.serving.model
        data = [{"id": name, "object": "model", "created": request.app.state.created, "owned_by": "tandem",
                 "root": m.root, "parent": None, "max_model_len": m.max_model_len} for name in m.names]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/tokenize")
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> JSONResponse:
        serving: OpenAIServing = request.app.state.serving
        serving.model_name(req.model)
        if isinstance(req, TokenizeChatRequest):
            text = serving.render_chat(
                req.messages, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, chat_template=req.chat_template,
                template_kwargs=req.chat_template_kwargs,
            )
            ids = serving.encode(text, chat_rendered=True, add_special_tokens=req.add_special_tokens)
        else:
            ids = serving.encode(req.prompt, chat_rendered=False, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": serving.model.max_model_len, "tokens": ids,
                             "token_strs": None})

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> JSONResponse:
        serving: OpenAIServing = request.app.state.serving
        serving.model_name(req.model)
        vocab = serving.model.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return JSONResponse({"prompt": serving.decode(req.tokens)})

    @app.get("/health")
    async def health(request: Request) -> Response:
        reason = request.app.state.serving.client.dead_reason
        if reason is not None:
            return error_response(503, reason, code="engine_dead")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        metrics: ServerMetrics = request.app.state.metrics
        stats = await request.app.state.serving.client.get_stats()
        if stats is not None:
            metrics.engine.stats = stats
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def get_version() -> JSONResponse:
        return JSONResponse({"version": version})

    return app
