"""The emulator's HTTP face: aiohttp handlers of vLLM's OpenAI-compatible API, request limits,
vLLM's error shape, and the token stream (server-sent events) written to its deadlines."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import hdrs, web

from .._openai_request import BadRequest, RequestLimits, check_model, is_json_type, json_body
from .answer import answer_words, chunk_event, role_event, timing, whole_body
from .metrics import render
from .prompts import Generation
from .request import Request
from .scheduler import sleep_until

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

    from .app import Emulator

__all__ = ["OpenAIRoutes", "error_response", "limits_middleware"]

log = logging.getLogger("pytest_kvcache.emulator")

perf = time.perf_counter


class _EventStream(web.StreamResponse):
    """A streamed response whose headers leave with the first chunk (one send, not two).

    aiohttp >= 3.12 buffers headers when ``_send_headers_immediately`` is false; older
    versions send them at ``prepare()`` as before.  Clients see the status line no later
    than the first token, exactly when they need it.
    """

    _send_headers_immediately = False


def error_response(message: str, code: int) -> web.Response:
    """An error in vLLM's JSON shape."""
    etype = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}.get(code, "BadRequestError")
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.Response(status=code, text=json.dumps(body), content_type="application/json")


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def limits_middleware(max_header_bytes: int) -> Middleware:
    """Middleware: 431 for a request head over the limit, and aiohttp's own 4xx (no route, wrong
    method) in vLLM's JSON error shape."""

    @web.middleware
    async def limits(request: web.Request, handler: _Handler) -> web.StreamResponse:
        raw = request.raw_headers
        size = len(request.method) + len(request.raw_path) + 11 + sum(len(k) + len(v) + 4 for k, v in raw)
        if size > max_header_bytes:
            return error_response(f"request line and headers are {size} bytes, over the limit of "
                                  f"{max_header_bytes} bytes (--max-header-bytes)", 431)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(f"{exc.reason}: {request.method} {request.path[:200]}", exc.status)

    return limits


async def read_body(request: web.Request, limits: RequestLimits) -> dict:
    """A request's JSON object, within the limits."""
    if hdrs.CONTENT_TYPE in request.headers and not is_json_type(request.content_type):
        raise BadRequest(f"Content-Type {request.headers[hdrs.CONTENT_TYPE][:100]!r} is not supported: "
                         "send application/json", 415)
    too_large = BadRequest(f"request body is over the limit of {limits.max_body_bytes} bytes (--max-body-bytes)",
                           413)
    if (request.content_length or 0) > limits.max_body_bytes:
        raise too_large  # before reading any of it
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a body without Content-Length, counted as it came
        raise too_large from None
    except Exception as exc:  # noqa: BLE001 - a body cut short or badly chunked is the client's fault
        raise BadRequest(f"request body could not be read: {exc}") from None
    return json_body(raw, limits.max_json_depth)


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@dataclass
class _Reply:
    """A request past its scheduling: what its answer says and when its tokens left."""

    req: Request
    chat: bool
    gen: Generation
    queue_ms: float
    cached: int
    first: float  # the first token's deadline
    words: list[str]
    stamps: list[float] = field(default_factory=list)  # perf_counter just before each token's write

    def timing(self) -> dict:
        return timing(self.req, self.queue_ms, self.cached, self.stamps)


class OpenAIRoutes:
    """The handlers of one emulated server's endpoints."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.s = emu.s
        self.created = int(time.time())

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/version", self.version)
        r.add_get("/v1/models", self.models)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/detokenize", self.detokenize)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_get("/metrics", self.metrics)
        r.add_post("/reset_prefix_cache", self.reset_prefix_cache)

    async def _body(self, request: web.Request) -> dict:
        body = await read_body(request, self.s.limits)
        check_model(body, self.s.model)
        return body

    # -- small endpoints ---------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        # kvcache_backend: the offload tier it runs, so that --kv-server external knows which items it serves
        return web.json_response({"version": self.s.served_version, "kvcache_backend": self.s.backend})

    async def models(self, request: web.Request) -> web.Response:
        m = self.s.model
        body = {"object": "list", "data": [{
            "id": m, "object": "model", "created": self.created, "owned_by": "vllm",
            "root": m, "parent": None, "max_model_len": self.s.max_model_len,
            "permission": []}]}
        return web.json_response(body)

    async def tokenize(self, request: web.Request) -> web.Response:
        prompts = self.emu.prompts
        try:
            body = await self._body(request)
            ids: Sequence[int]
            if "messages" in body:
                ids = prompts.chat_ids(body)
            elif isinstance(body.get("prompt"), str):
                prompts.check_chars(len(body["prompt"]))
                ids = prompts.encode(body["prompt"])
            else:
                raise BadRequest("'prompt' (a string) or 'messages' is required")
        except BadRequest as exc:
            return error_response(str(exc), exc.code)
        return web.json_response({"count": len(ids), "max_model_len": self.s.max_model_len,
                                  "tokens": ids, "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise BadRequest("'tokens' must be a list of integers")
            try:
                text = self.emu.tok.decode(ids)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        except BadRequest as exc:
            return error_response(str(exc), exc.code)
        return web.json_response({"prompt": text})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        await self.emu.offload.reset()
        log.info("prefix cache reset")
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        emu = self.emu
        text = render(self.s.model, emu.stats, emu.scheduler.load, self.s.profile.gpu_kv_capacity_tokens,
                      emu.cache, self.s.backend)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    # -- generation ---------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = perf()
        # Let every request that arrived in the same burst stamp its arrival before any
        # of them parses its body: otherwise the 16th of 16 simultaneous requests is
        # stamped only after the other 15 were parsed (~0.3 ms each).
        await asyncio.sleep(0)
        emu = self.emu
        try:
            gen = emu.prompts.generation(await self._body(request), chat)
        except BadRequest as exc:
            return error_response(str(exc), exc.code)
        rid, seq = emu.next_rid("chatcmpl" if chat else "cmpl")
        if emu.faults.fails(seq):
            return error_response("fault injection: internal server error", 500)
        req = Request(rid, seq, emu.prompts.served(gen), arrival, gen.max_tokens)
        resp: web.StreamResponse | None = None
        if gen.stream:
            cls = web.StreamResponse if self.s.send_headers_early else _EventStream
            resp = cls(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
        return await self._serve(resp, req, chat, gen)

    async def _serve(self, resp: web.StreamResponse | None, req: Request, chat: bool,
                     gen: Generation) -> web.StreamResponse:
        """Schedule ``req`` and answer it (a stream where ``resp`` is one)."""
        emu = self.emu
        sched = emu.scheduler
        started = False
        me = asyncio.current_task()
        if me is not None:
            emu.active.add(me)
        try:
            queue_ms, cached, deadline = await sched.first_token(req)
            started = True
            reply = _Reply(req, chat, gen, queue_ms, cached, deadline + emu.faults.stall_s(req.seq),
                           answer_words(emu.tok, req, self.s.seed))
            if resp is None:  # non-streaming: wait through all the token deadlines
                return await self._whole(reply)
            return await self._stream(resp, reply)
        except ConnectionResetError:
            # the client went away mid-stream (a load generator's timeout, a test)
            log.debug("request %s: client disconnected", req.rid)
            emu.stats.aborted += 1
            return resp if resp is not None else web.Response(status=499)
        except asyncio.CancelledError:
            emu.stats.aborted += 1
            raise
        finally:
            if me is not None:
                emu.active.discard(me)
            if started:
                sched.release(req)
            sched.after_response(req)

    async def _token(self, reply: _Reply, k: int, deadline: float, spin: float) -> float:
        """Sleep to token ``k``'s deadline (``deadline``: the one before) and stamp it; return its deadline."""
        sched = self.emu.scheduler
        if k:
            deadline = sched.token_deadline(reply.req, k, reply.first, deadline)
        await sleep_until(deadline, spin)
        reply.stamps.append(perf())
        if not k:
            sched.load.decoding += 1  # past its first token
        return deadline

    async def _whole(self, reply: _Reply) -> web.Response:
        """A non-streamed answer, sent after its last token's deadline."""
        emu = self.emu
        req = reply.req
        created = int(time.time())
        deadline = reply.first
        spin = emu.scheduler.spin
        try:
            for k in range(req.max_tokens):
                # the first token's stamp is the TTFT, the last one's the response's end
                deadline = await self._token(reply, k, deadline, spin if k in (0, req.max_tokens - 1) else 0.0)
                emu.stats.generation_tokens += 1
            timing_ = reply.timing()
            emu.stats.finish(req, reply.stamps)
            return web.json_response(whole_body(req, reply.chat, created, self.s.model, "".join(reply.words),
                                                timing_))
        finally:
            if reply.stamps:
                emu.scheduler.load.decoding -= 1

    async def _stream(self, resp: web.StreamResponse, reply: _Reply) -> web.StreamResponse:
        """A streamed answer: each token's event is built first, then written at its deadline."""
        emu = self.emu
        req, chat, gen = reply.req, reply.chat, reply.gen
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": req.rid, "object": obj, "created": int(time.time()), "model": self.s.model}
        n, mt = req.n, req.max_tokens
        deadline = reply.first
        spin = emu.scheduler.spin
        try:
            for k in range(mt):
                # build the chunk first, then sleep to its deadline, stamp and write, so
                # that the bytes leave as close to the deadline as the loop allows
                last = k == mt - 1
                usage = {"prompt_tokens": n, "total_tokens": n + k + 1, "completion_tokens": k + 1} \
                    if gen.continuous else None
                chunk = chunk_event(head, chat, reply.words[k], last, usage)
                payload = _event(role_event(head, n, gen.continuous)) if k == 0 and chat else b""
                timed = last and not gen.include_usage
                if not timed:
                    payload += _event(chunk)
                # stamps are taken just before each write (the write hands the bytes to
                # the socket at once; aiohttp sets TCP_NODELAY)
                deadline = await self._token(reply, k, deadline, spin)
                if timed:
                    chunk["emulator_timing"] = reply.timing()
                    payload += _event(chunk)
                await resp.write(payload)
                emu.stats.generation_tokens += 1
            await resp.write(self._tail(head, reply) + b"data: [DONE]\n\n")
            emu.stats.finish(req, reply.stamps)
            await resp.write_eof()
            return resp
        finally:
            if reply.stamps:
                emu.scheduler.load.decoding -= 1

    @staticmethod
    def _tail(head: dict, reply: _Reply) -> bytes:
        """The final usage event, where the request asked for it (it carries the timing)."""
        if not reply.gen.include_usage:
            return b""
        n, mt = reply.req.n, reply.req.max_tokens
        final = dict(head, choices=[], usage={"prompt_tokens": n, "total_tokens": n + mt, "completion_tokens": mt})
        final["emulator_timing"] = reply.timing()
        return _event(final)
