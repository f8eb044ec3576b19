"""`bitcompile serve`: the OpenAI-compatible HTTP API over one engine (Starlette, run by uvicorn).

Every model call happens on the engine's thread (the scheduler's); the event loop only parses,
validates, and waits for the engine's events (handed over with call_soon_threadsafe). A streaming
client that goes away cancels its request, so its sequence leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..runtime.chat import ChatError
from ..runtime.scheduler import QueueFullError, log_softmax
from . import protocol as api
from .limits import RateLimiter, check_api_key
from .metrics import Metrics
from .protocol import ApiError

log = logging.getLogger("bitcompile.serve")


class Server:
    def __init__(self, engine, model_name: str, api_keys: list[str] | None = None,
                 limiter: RateLimiter | None = None, max_prompt_tokens: int | None = None,
                 max_tokens_limit: int | None = None, max_body_bytes: int = 1 << 20,
                 request_timeout_s: float | None = None, log_prompts: bool = False):
        self.engine, self.model = engine, model_name
        self.scheduler = engine.scheduler()
        self.api_keys = api_keys
        self.limiter = limiter or RateLimiter(None, None)
        context = engine.context_length
        self.max_prompt_tokens = min(max_prompt_tokens or context - 1, context - 1)
        self.max_tokens_limit = min(max_tokens_limit or context, context)
        self.max_body_bytes, self.request_timeout_s, self.log_prompts = max_body_bytes, request_timeout_s, log_prompts
        self.metrics = Metrics(self.scheduler.status)
        self.started = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics_page, methods=["GET"])]
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            self.engine.close()  # requests still running end as cancelled

        return Starlette(routes=routes, lifespan=lifespan)

    # -- plain endpoints ---------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        self.metrics.requests.labels("/health", "200").inc()
        return JSONResponse({"status": "ok", "model": self.model})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        return await self._handle(request, "/v1/models", self._models, body_needed=False)

    async def _models(self, request, body, client, rid):
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model",
                                                         "created": self.started, "owned_by": "bitcompile"}]})

    # -- the generation endpoints ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/completions", self._completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/chat/completions", self._chat)

    async def _completion(self, request, body, client, rid):
        api.check_model(body, self.model)
        prompt = api.completion_prompt(body, self.engine.config.vocab_size)
        options = api.sampling(body, self.engine.generation_defaults, self.max_tokens_limit, 16)
        echo = api.boolean(body, "echo", False)
        logprobs = api.logprobs_field(body)
        stream, include_usage = api.stream_fields(body)
        ids = self._prompt_ids(prompt, "prompt")
        prompt_text = self.engine.decode(ids) if isinstance(prompt, list) else prompt
        echoed = await self._prompt_logprobs(ids, logprobs) if echo and logprobs is not None else None
        if options["max_new_tokens"] == 0:
            self.limiter.spend(client, len(ids))
            self.metrics.prompt_tokens.inc(len(ids))
            self._log(rid, "/v1/completions", 200, client, len(ids), 0, None)
            text = prompt_text if echo else ""
            return JSONResponse(api.completion(rid, self.model, text, "length", echoed, api.usage(len(ids), 0)))
        events, handle = self._submit(ids, options, logprobs)
        prefix = prompt_text if echo else ""
        if stream:
            def chunk(text, reason, use=None):
                body = api.completion(rid, self.model, text, reason, None, use)
                if use is not None:  # the usage chunk carries no choice
                    body["choices"] = []
                return body
            return self._sse(self._stream(rid, "/v1/completions", client, handle, events, chunk, prefix,
                                          include_usage))
        await self._wait(handle, events)
        self._finished(rid, "/v1/completions", client, handle)
        lp = self._generated_logprobs(handle, echoed) if logprobs is not None else None
        return JSONResponse(api.completion(rid, self.model, prefix + handle.text, _reason(handle), lp,
                                           api.usage(len(ids), handle.completion_tokens)))

    async def _chat(self, request, body, client, rid):
        api.check_model(body, self.model)
        messages = api.chat_messages(body)
        stream, include_usage = api.stream_fields(body)
        try:
            ids = self.engine.chat_prompt(messages)
        except ChatError as e:
            raise api.bad("messages", str(e), "chat_template") from None
        except ValueError as e:
            raise api.bad("messages", str(e)) from None
        self._check_prompt_length(ids, "messages")
        room = self.engine.context_length - len(ids)
        options = api.sampling(body, self.engine.generation_defaults, self.max_tokens_limit,
                               min(room, self.max_tokens_limit), ("max_tokens", "max_completion_tokens"))
        events, handle = self._submit(ids, options, None)
        if stream:
            def chunk(text, reason, use=None):
                if use is not None:
                    return api.chat_chunk(rid, self.model, None, None, use)
                return api.chat_chunk(rid, self.model, {} if reason else {"content": text}, reason)
            first = api.chat_chunk(rid, self.model, {"role": "assistant", "content": ""}, None)
            return self._sse(self._stream(rid, "/v1/chat/completions", client, handle, events, chunk, "",
                                          include_usage, first))
        await self._wait(handle, events)
        self._finished(rid, "/v1/chat/completions", client, handle)
        return JSONResponse(api.chat_completion(rid, self.model, handle.text, _reason(handle),
                                                api.usage(len(ids), handle.completion_tokens)))

    # -- the engine, from the event loop ---------------------------------------------------------------
    def _prompt_ids(self, prompt, param: str) -> list[int]:
        try:
            ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        except Exception as e:  # noqa: BLE001 - the tokenizer's own errors
            raise api.bad(param, f"cannot be tokenized: {e}") from None
        self._check_prompt_length(ids, param)
        return ids

    def _check_prompt_length(self, ids: list[int], param: str):
        if len(ids) > self.max_prompt_tokens:
            raise api.ApiError(400, f"{param}: {len(ids)} tokens is more than this server takes ({self.max_prompt_tokens}"
                               f" tokens; context {self.engine.context_length})", param=param,
                               code="context_length_exceeded")

    def _submit(self, ids: list[int], options: dict, logprobs: int | None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, data):  # engine thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))

        try:
            handle = self.engine.submit(ids, logprobs=logprobs, on_event=on_event, **options)
        except QueueFullError as e:
            raise ApiError(503, f"the server is busy: {e}", kind="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise api.bad("request", str(e)) from None
        return events, handle

    async def _wait(self, handle, events: asyncio.Queue):
        """Until the request ends (or the timeout: then it is cancelled and refused with 504)."""
        async def drain():
            while (await events.get())[0] != "done":
                pass

        try:
            await asyncio.wait_for(drain(), self.request_timeout_s)
        except asyncio.TimeoutError:
            handle.cancel()
            raise ApiError(504, f"the request took longer than the server's limit ({self.request_timeout_s} s; "
                                "--request-timeout)", kind="server_error", code="timeout") from None
        except asyncio.CancelledError:
            handle.cancel()
            raise
        if handle.finish_reason == "error":
            raise ApiError(500, f"generation failed: {handle.error}", kind="server_error", code="engine_error")

    async def _stream(self, rid, endpoint, client, handle, events, chunk, prefix, include_usage, first=None):
        """The SSE chunks of a streamed request (dicts, or JSON text for the text pieces). Pieces that
        arrived together go out as one chunk: a client that reads slower than the engine steps gets
        fewer, longer chunks instead of a growing backlog."""
        loop = asyncio.get_running_loop()
        deadline = None if self.request_timeout_s is None else loop.time() + self.request_timeout_s
        piece_json = _PieceEncoder(chunk)
        status = 200
        try:
            if first is not None:
                yield first
            if prefix:
                yield chunk(prefix, None)
            while True:
                try:
                    async with asyncio.timeout_at(deadline):  # cheaper than wait_for: no task per event
                        kind, data = await events.get()
                except TimeoutError:
                    handle.cancel()
                    status = 504
                    yield ApiError(504, f"the request took longer than the server's limit ({self.request_timeout_s}"
                                        " s; --request-timeout)", kind="server_error", code="timeout").body()
                    return
                pieces = []
                while kind == "piece":
                    pieces.append(data)
                    if events.empty():
                        break
                    kind, data = events.get_nowait()
                if pieces:
                    yield piece_json("".join(pieces))
                if kind == "piece":
                    continue
                if handle.finish_reason == "error":
                    status = 500
                    yield ApiError(500, f"generation failed: {handle.error}", kind="server_error").body()
                    return
                yield chunk("", _reason(handle))
                if include_usage:
                    yield chunk("", None, api.usage(handle.prompt_tokens, handle.completion_tokens))
                return
        finally:  # the client went away, or the stream ended: the sequence leaves at the next step
            handle.cancel()
            self._finished(rid, endpoint, client, handle, status, streamed=True)

    def _sse(self, chunks) -> StreamingResponse:
        async def lines():
            async for chunk in chunks:
                yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _prompt_logprobs(self, ids: list[int], top: int) -> dict:
        """Log-probabilities of the prompt's own tokens (echo), from one prefill on the engine thread."""
        logits = await asyncio.wrap_future(self.scheduler.call(lambda: self.engine.logits(ids)))
        lp = log_softmax(logits)
        token_lp = [None] + [float(lp[i, t]) for i, t in enumerate(ids[1:])]
        tops = [None] + [{self._piece(int(t)): float(lp[i, t]) for t in lp[i].argsort()[::-1][:top]}
                         for i in range(len(ids) - 1)]
        return self._logprobs_block(ids, token_lp, tops)

    def _generated_logprobs(self, handle, echoed: dict | None) -> dict:
        tops = [{self._piece(t): lp for t, lp in top.items()} for top in handle.top_logprobs]
        ids = handle.output_ids
        block = self._logprobs_block(ids, handle.token_logprobs[: len(ids)], tops[: len(ids)])
        if echoed is None:
            return block
        shift = echoed["text_offset"][-1] + len(echoed["tokens"][-1]) if echoed["tokens"] else 0
        return {"tokens": echoed["tokens"] + block["tokens"],
                "token_logprobs": echoed["token_logprobs"] + block["token_logprobs"],
                "top_logprobs": echoed["top_logprobs"] + block["top_logprobs"],
                "text_offset": echoed["text_offset"] + [o + shift for o in block["text_offset"]]}

    def _logprobs_block(self, ids, token_lp, tops) -> dict:
        tokens = [self._piece(t) for t in ids]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": tops, "text_offset": offsets}

    def _piece(self, token: int) -> str:
        return self.engine.tokenizer.decode([token], skip_special_tokens=False)

    # -- the frame around every request ------------------------------------------------------------------
    async def _handle(self, request: Request, endpoint: str, handler, body_needed: bool = True) -> Response:
        rid = api.new_id("cmpl" if endpoint == "/v1/completions" else "chatcmpl")
        client = request.client.host if request.client else "-"
        try:
            if self.api_keys is not None:
                key = check_api_key(request.headers.get("authorization"), self.api_keys)
                client = f"key#{self.api_keys.index(key)}"
            self.limiter.admit(client)
            body = await self._json(request) if body_needed else {}
            response = await handler(request, body, client, rid)
        except ApiError as e:
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            self._log(rid, endpoint, e.status, client, None, None, e.message)
        except Exception as e:  # a bug of ours: the client gets a 500, the server goes on
            log.exception("%s %s failed", rid, endpoint)
            response = JSONResponse(ApiError(500, f"internal error: {e}", kind="server_error").body(),
                                    status_code=500)
        if not isinstance(response, StreamingResponse):
            self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def _json(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body_bytes:
                raise self._too_large()
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server takes ({self.max_body_bytes} bytes; "
                             "--max-body-bytes)", code="body_too_large")

    def _finished(self, rid, endpoint, client, handle, status: int = 200, streamed: bool = False):
        self.metrics.finished(handle)
        self.limiter.spend(client, handle.prompt_tokens + handle.completion_tokens)
        if streamed:
            self.metrics.requests.labels(endpoint, str(status)).inc()
        reason = handle.finish_reason or "cancelled"
        self._log(rid, endpoint, status, client, handle.prompt_tokens, handle.completion_tokens,
                  f"finish={reason} ttft={_s(handle.ttft_s)} total={_s(time.perf_counter() - handle.submitted_at)}"
                  + (f" prompt={self.engine.decode(handle.prompt_ids)!r}" if self.log_prompts else ""))

    def _log(self, rid, endpoint, status, client, prompt_tokens, completion_tokens, detail):
        log.info("%s %s %s client=%s prompt_tokens=%s completion_tokens=%s %s", rid, endpoint, status, client,
                 "-" if prompt_tokens is None else prompt_tokens,
                 "-" if completion_tokens is None else completion_tokens, detail or "")


class _PieceEncoder:
    """A text piece's SSE chunk as JSON text: the request's chunk serialized once around a marker,
    then only the piece is encoded for each token (the rest of a chunk never changes in a stream)."""

    MARK = "\x00piece\x00"

    def __init__(self, chunk):
        self.head, self.tail = json.dumps(chunk(self.MARK, None)).split(json.dumps(self.MARK))

    def __call__(self, text: str) -> str:
        return self.head + json.dumps(text) + self.tail


def _reason(handle) -> str:
    return "stop" if handle.finish_reason == "stop" else "length"


def _s(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.3f}s"


def serve(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, **options):
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = Server(engine, model_name, **options).app()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
