"""The gateway's ASGI application (Starlette): OpenAI's API under /v1, Ollama's under /api.

Each endpoint reads its JSON body (at most ``max_body`` bytes: 413 past it), translates it with
``openai`` / ``ollama`` (pure), runs it on a pooled Client (``bridge``) and translates the reply
back.  Every error is an ``LlmosdError`` with its HTTP status (``fields.status_of``) in the
shape of the API that was called.  A stream first reads the daemon's first chunk, so that an
unknown model or a busy daemon is an HTTP status rather than a broken stream; after that, an
error is the stream's last event.  A client that goes away (while its request waits or loads,
mid-stream, or while a non-streamed answer is generated) cancels the generation on the daemon
at once.  Big bodies (embeddings) are encoded on a worker thread, so other streams never stall.
"""
from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from typing import AsyncIterator

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__, protocol
from ..errors import Internal, LlmosdError, TooLarge
from . import ollama, openai
from .bridge import Gone, Pool, Stream, until_gone, watch
from .fields import BadField, NotFound, Unauthorized, clean, status_of

log = logging.getLogger("llmctl.http")
MAX_BODY = protocol.DEFAULT_MAX_MESSAGE          # a body the daemon could not take is refused here
DRAIN = 4                # a body up to DRAIN x max_body is read (and dropped) before its 413
NDJSON, SSE = "application/x-ndjson", "text/event-stream"


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Pump(StreamingResponse):
    """A streamed answer whose ``events`` are sent as they come, while the request's receive
    channel is watched: when the client disconnects the iteration is cancelled; whatever
    ends it, ``stream.close()`` then cancels the generation on the daemon (if unfinished)."""

    def __init__(self, stream: Stream, events: AsyncIterator[bytes], media_type: str):
        super().__init__(events, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, receive, tg.cancel_scope)
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    async for data in self.body_iterator:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:                 # the connection broke under a send
                    pass
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await self.stream.close()


async def _drain(receive, stream: Stream, add) -> bool:
    """Read ``stream`` to its end into ``add`` while watching for the client going away; True
    when it went away (the generation is then cancelled).  Closes the stream."""
    async def read():
        chunks = stream.first
        while chunks is not None:
            for chunk in chunks:
                add(chunk)
            chunks = await stream.batch()
    try:
        return await until_gone(receive, read)
    finally:
        await stream.close()


async def _off_loop(build, *args) -> Response:
    """``build(*args)`` (a Response with a big body to encode) on a worker thread."""
    return await anyio.to_thread.run_sync(build, *args)


def _start(call):
    """The function that starts ``call``'s generation on a Client (an Ollama "prompt" call is
    resolved against the model's chat template first)."""
    def start(client):
        c = call
        if c.kind == "prompt":
            c = ollama.resolve(c, bool(client.show(c.model)["manifest"].get("chat_template")))
        method = client.chat if c.kind == "chat" else client.generate
        return method(c.model, **c.args)
    return start


def _embed(client, model: str, inputs: list[str], keep_alive: float | None):
    """(vectors: count x dim float32, token count) for ``inputs``, batched as the Client does."""
    rows, tokens = [], 0
    for r in client._batches("embed", inputs, clean({"model": model, "keep_alive": keep_alive})):
        rows.append(np.frombuffer(r["data"], dtype="<f4").reshape(r["count"], r["dim"]))
        tokens += sum(r.get("tokens") or [])
    return np.concatenate(rows), tokens


class Gateway:
    """The routes, over one ``Pool``; ``keys`` (bytes) when API keys are required."""

    def __init__(self, pool: Pool, keys: list[str] | None = None, max_body: int = MAX_BODY):
        self.pool, self.max_body = pool, max_body
        self.keys = [k.encode() for k in keys or []]

    # -- plumbing -------------------------------------------------------------------------------
    def app(self) -> Starlette:
        o, a = "openai", "ollama"
        routes = [
            Route("/v1/chat/completions", self._ep(o, self.v1_chat), methods=["POST"]),
            Route("/v1/completions", self._ep(o, self.v1_completions), methods=["POST"]),
            Route("/v1/embeddings", self._ep(o, self.v1_embeddings), methods=["POST"]),
            Route("/v1/models", self._ep(o, self.v1_models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._ep(o, self.v1_model), methods=["GET"]),
            Route("/api/generate", self._ep(a, self.api_generate), methods=["POST"]),
            Route("/api/chat", self._ep(a, self.api_chat), methods=["POST"]),
            Route("/api/tags", self._ep(a, self.api_tags), methods=["GET"]),
            Route("/api/ps", self._ep(a, self.api_ps), methods=["GET"]),
            Route("/api/show", self._ep(a, self.api_show), methods=["POST"]),
            Route("/api/embed", self._ep(a, self.api_embed), methods=["POST"]),
            Route("/api/embeddings", self._ep(a, self.api_embeddings), methods=["POST"]),
            Route("/api/version", self._ep(a, self.api_version), methods=["GET"]),
            Route("/", self.root, methods=["GET", "HEAD"]),
        ]
        handlers = {404: self._not_found, 405: self._not_allowed}
        return Starlette(routes=routes, exception_handlers=handlers)

    def _ep(self, api: str, handler):
        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except Gone:
                return Response(status_code=499)      # nobody is listening any more
            except LlmosdError as e:
                return self.error(api, e)
            except Exception:      # noqa: BLE001 - a gateway bug: logged, answered 500, served on
                log.exception("%s %s failed", request.method, request.url.path)
                return self.error(api, Internal("the gateway failed on this request",
                                                hint="this is a bug in llmctl serve-http; its log has the traceback"))
        return endpoint

    def error(self, api: str, e: LlmosdError) -> Response:
        status = status_of(e)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else \
                  {"Retry-After": "1"} if status in (429, 503) else {}
        if api == "openai":
            body = openai.error_body(status, e.message, param=getattr(e, "param", None), code=e.name, hint=e.hint)
        else:
            body = ollama.error_body(e.message, e.hint)
        return JSONResponse(body, status_code=status, headers=headers)

    async def _not_found(self, request: Request, exc) -> Response:
        return self.error(_api_of(request), NotFound(f"no such endpoint: {request.url.path}"))

    async def _not_allowed(self, request: Request, exc) -> Response:
        err = BadField(None, f"{request.method} is not allowed on {request.url.path}")
        resp = self.error(_api_of(request), err)
        resp.status_code = 405
        return resp

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self.keys):
            raise Unauthorized("a valid API key is required" if not token else "invalid API key")

    async def body(self, request: Request):
        """The JSON body: TooLarge past ``max_body`` bytes, BadField when it is not JSON."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > DRAIN * self.max_body:
            raise TooLarge(f"the request body has {int(length)} bytes; at most {self.max_body} are accepted")
        buf, total = bytearray(), 0
        async for part in request.stream():      # read (up to DRAIN x) even when too large, so the
            total += len(part)                   # client gets the 413 rather than a reset
            if total <= self.max_body:
                buf += part
            elif total > DRAIN * self.max_body:
                break
        if total > self.max_body:
            raise TooLarge(f"the request body is over {self.max_body} bytes; at most {self.max_body} are accepted",
                           hint="send a shorter prompt, or fewer inputs per request")
        if not buf.strip():
            raise BadField(None, "the request body is empty; send a JSON object")
        try:
            return json.loads(buf)
        except (ValueError, RecursionError) as e:
            raise BadField(None, f"the request body is not valid JSON: {e}"[:300]) from None

    # -- OpenAI -----------------------------------------------------------------------------------
    async def v1_chat(self, request: Request) -> Response:
        return await self._openai_generation(request, openai.chat_call(await self.body(request)), True)

    async def v1_completions(self, request: Request) -> Response:
        return await self._openai_generation(request, openai.completion_call(await self.body(request)), False)

    async def _openai_generation(self, request: Request, call: openai.Call, chat: bool) -> Response:
        stream = await self.pool.stream(_start(call), request.receive)
        cid, created = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), int(time.time())
        if call.stream:
            return Pump(stream, _openai_events(stream, openai.Streamer(call, cid, created, chat)), SSE)
        got = openai.Collector()
        if await _drain(request.receive, stream, got.add):
            return Response(status_code=499)          # nobody is listening any more
        build = openai.chat_response if chat else openai.completion_response
        return JSONResponse(build(call, cid, created, got, stream.stats))

    async def v1_embeddings(self, request: Request) -> Response:
        call = openai.embed_call(await self.body(request))
        vectors, tokens = await self.pool.run(_embed, call.model, call.inputs, None)
        return await _off_loop(lambda: JSONResponse(openai.embeddings_response(call, vectors, tokens)))

    async def v1_models(self, request: Request) -> Response:
        return JSONResponse(openai.models_response(await self.pool.run(lambda c: c.ls())))

    async def v1_model(self, request: Request) -> Response:
        name = request.path_params["model"]

        def find(c):
            canon = c.show(name)["model"]
            return next((r for r in c.ls() if r["model"] == canon), {"model": canon})
        return JSONResponse(openai.model_row(await self.pool.run(find)))

    # -- Ollama -----------------------------------------------------------------------------------
    async def api_generate(self, request: Request) -> Response:
        return await self._ollama_generation(request, ollama.generate_call(await self.body(request)))

    async def api_chat(self, request: Request) -> Response:
        return await self._ollama_generation(request, ollama.chat_call(await self.body(request)))

    async def _ollama_generation(self, request: Request, call: ollama.Call) -> Response:
        if call.kind in ("load", "unload"):
            def act(c):
                return c.load(call.model, **call.args) if call.kind == "load" else c.unload(call.model)
            await self.pool.run(act)
            body = ollama.loaded(call, ollama.iso(None))
            return Response(_json(body) + b"\n", media_type=NDJSON) if call.stream else JSONResponse(body)
        stream = await self.pool.stream(_start(call), request.receive)
        if call.stream:
            return Pump(stream, _ollama_events(stream, call), NDJSON)
        pieces: list[str] = []
        if await _drain(request.receive, stream, lambda ch: pieces.append(ch.get("text", ""))):
            return Response(status_code=499)
        return JSONResponse(ollama.final(call, "".join(pieces), stream.stats, ollama.iso(None)))

    async def api_tags(self, request: Request) -> Response:
        return JSONResponse(ollama.tags(await self.pool.run(lambda c: c.ls())))

    async def api_ps(self, request: Request) -> Response:
        instances, models = await self.pool.run(lambda c: (c.ps(), c.ls()))
        return JSONResponse(ollama.ps(instances, models))

    async def api_show(self, request: Request) -> Response:
        body = await self.body(request)
        model = ollama.model_of(body)

        def show(c):
            reply = c.show(model)
            return reply, next((r for r in c.ls() if r["model"] == reply["model"]), None)
        reply, row = await self.pool.run(show)
        return JSONResponse(ollama.show(reply, row))

    async def api_embed(self, request: Request, legacy: bool = False) -> Response:
        model, inputs, keep = ollama.embed_inputs(await self.body(request), legacy)
        t0 = time.monotonic()
        vectors, tokens = await self.pool.run(_embed, model, inputs, keep)
        ms = (time.monotonic() - t0) * 1e3
        return await _off_loop(lambda: JSONResponse(ollama.embed_response(model, vectors, tokens, ms, legacy)))

    async def api_embeddings(self, request: Request) -> Response:
        return await self.api_embed(request, legacy=True)

    async def api_version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("llmosd is running (OpenAI API under /v1, Ollama API under /api)\n")


def _api_of(request: Request) -> str:
    return "openai" if request.url.path.startswith("/v1") else "ollama"


async def _openai_events(stream: Stream, streamer: openai.Streamer) -> AsyncIterator[bytes]:
    """The SSE body: one send per batch of chunks that were waiting together."""
    start = b"".join(openai.sse(event) for event in streamer.start())
    chunks = stream.first
    try:
        while chunks is not None:
            data = b"".join(openai.sse(e) for e in map(streamer.chunk, chunks) if e is not None)
            if start:
                data, start = start + data, b""
            if data:
                yield data
            chunks = await stream.batch()
    except LlmosdError as e:      # after the headers: the stream's last event says it
        yield start + openai.sse(openai.error_body(status_of(e), e.message, code=e.name, hint=e.hint))
        return
    yield start + b"".join(openai.sse(event) for event in streamer.end(stream.stats))


async def _ollama_events(stream: Stream, call: ollama.Call) -> AsyncIterator[bytes]:
    """The NDJSON body: one send per batch of chunks that were waiting together."""
    chunks = stream.first
    try:
        while chunks is not None:
            now = ollama.iso(None)
            data = b"".join(_json(ollama.piece(call, c["text"], now)) + b"\n" for c in chunks if c.get("text"))
            if data:
                yield data
            chunks = await stream.batch()
    except LlmosdError as e:
        yield _json(ollama.error_body(e.message, e.hint)) + b"\n"
        return
    yield _json(ollama.final(call, "", stream.stats, ollama.iso(None))) + b"\n"


def create_app(socket: str | None = None, *, keys: list[str] | None = None, timeout: float = 60.0,
               max_body: int = MAX_BODY) -> Starlette:
    """The gateway's ASGI app for the daemon at ``socket`` (the default endpoint if None)."""
    pool = Pool(socket, timeout=timeout)
    app = Gateway(pool, keys, max_body).app()
    app.state.pool = pool
    return app
