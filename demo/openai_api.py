"""OpenAI-compatible routes on the page's server: GET /v1/models, POST /v1/chat/completions and
POST /v1/completions (`"stream": true` for server-sent events). A request is the request schema
(genarm_core/request.py) under OpenAI's names, checked under the page's limits, and its streams join
the page's engine scheduler: API users and visitors decode in one batch.

Beyond OpenAI's fields a request may carry `weights` ({"harmlessness": 2}; ARMs not named are off)
and the schema's options OpenAI lacks (top_k, min_p, repetition_penalty, no_repeat_ngram_size,
normalised). A response adds per token the base's and each ARM's log-prob beside the fused one
(with `logprobs`), and `genarm`: the options and weights it was decoded with.

Choice i of n is decoded with seed + i: the engine's panes of one request share their random draws,
so n choices are n streams of their own. Without a seed, one is drawn at random (as OpenAI does);
the page and the Gradio API use the profile's seed instead.
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from genarm_core import Engine, Pane, RequestError, SamplingOptions, TokenEvent
from genarm_core import request as schema
from genarm_core.options import SEED_MAX
from genarm_core.prompts import prompt_ids

from .handlers import Context
from .requests import LIMITS, MAX_CHOICES, Busy, check_busy

router = APIRouter(prefix="/v1")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
DISCONNECT_POLL = 0.5  # seconds between checks that a waiting client is still there
# OpenAI's names for the schema's fields; every other option keeps its own name
OPENAI_NAMES = {"model": "profile", "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                **{n: n for n in schema.SAMPLING_NAMES if n != "max_new_tokens"}, "weights": "weights"}
ROUTE_FIELDS = {"chat": {"messages": "prompt", **OPENAI_NAMES}, "completions": {"prompt": "prompt", **OPENAI_NAMES}}
OWN_FIELDS = {"chat": {"n", "stream", "stream_options", "logprobs", "top_logprobs", "user"},
              "completions": {"n", "stream", "stream_options", "logprobs", "echo", "user"}}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0}  # accepted at their neutral value only


class ApiError(Exception):
    """An OpenAI-style error: the HTTP status, the message and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        return JSONResponse({"error": {"message": str(self), "type": kind.get(self.status, "server_error"),
                                       "param": self.param, "code": self.code}}, status_code=self.status)


def _param(message: str, body: dict) -> str | None:
    """The field a schema message names first ("max_tokens: ...", "messages[2].content: ...")."""
    head = message.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0].strip()
    return head if head in body or head in NEUTRAL else None


@dataclass
class Job:
    """A checked request: its engine, the prompt's token ids, the options, weights and n."""
    engine: Engine
    ids: list[int]
    options: SamplingOptions
    weights: dict[str, float]
    n: int
    stream: bool
    logprobs: bool
    include_usage: bool


def _context(request: Request) -> Context:
    return request.app.state.genarm


def _engine(ctx: Context, model) -> Engine:
    name = ctx.engines.default if model is None else model
    if not isinstance(name, str) or name not in ctx.engines.profiles:
        raise ApiError(404, f"model: {str(name)[:80]!r} is not offered here (offered: "
                            f"{', '.join(ctx.engines.profiles)}); GET /v1/models lists them", "model",
                       "model_not_found")
    eng, note = ctx.engines.get(name)
    if eng is None:
        raise ApiError(503, f"model: {note.replace('*', '').replace('`', '')}", "model", "model_unavailable")
    return eng


def _text(content, where: str) -> str:
    """A message's content: a text, or OpenAI's list of text parts."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
        return "".join(p["text"] for p in content)
    return content


def _own_fields(body: dict, route: str) -> tuple[int, bool, bool, bool]:
    """n, stream, logprobs and stream_options.include_usage, checked."""
    n = body.get("n", 1) if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise RequestError(f"n: expected an integer in [1, {MAX_CHOICES}], got {n!r}")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(f"stream: expected true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
            options.get("include_usage", False), bool):
        raise RequestError(f"stream_options: expected {{\"include_usage\": true or false}}, got {options!r}")
    logprobs = body.get("logprobs")
    if route == "chat":
        if logprobs is not None and not isinstance(logprobs, bool):
            raise RequestError(f"logprobs: expected true or false, got {logprobs!r}")
        if body.get("top_logprobs") not in (None, 0):
            raise RequestError("top_logprobs: only 0 is supported: each token's log-prob comes under the fused "
                               "distribution, the base and each ARM, without alternatives")
    else:
        if logprobs not in (None, 0) or isinstance(logprobs, bool):
            raise RequestError(f"logprobs: only 0 is supported (the chosen tokens' log-probs under the fused "
                               f"distribution, the base and each ARM, without alternatives), got {logprobs!r}")
        if body.get("echo") not in (None, False):
            raise RequestError("echo: only false is supported")
        logprobs = logprobs == 0
    return n, stream, bool(logprobs), bool(options.get("include_usage", False))


def check(ctx: Context, body, route: str) -> Job:
    """The request's engine, prompt ids, options, weights and OpenAI fields, or an ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
    fields, own = ROUTE_FIELDS[route], OWN_FIELDS[route]
    unknown = [k for k in body if k not in fields and k not in own and k not in NEUTRAL]
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(str, unknown))}; this server takes "
                            f"{', '.join([*fields, *sorted(own)])}", str(unknown[0]))
    prompt_name = "messages" if route == "chat" else "prompt"
    if prompt_name not in body:
        raise ApiError(400, f"{prompt_name}: required", prompt_name)
    eng = _engine(ctx, body.get("model"))
    try:
        for name, neutral in NEUTRAL.items():
            if body.get(name, neutral) not in (neutral, None):
                raise RequestError(f"{name}: not supported (use repetition_penalty or no_repeat_ngram_size)")
        n, stream, logprobs, include_usage = _own_fields(body, route)
        data = {fields[k]: v for k, v in body.items() if k in fields and k != "model"}
        if route == "chat" and isinstance(data.get("prompt"), list):
            data["prompt"] = [{**m, "content": _text(m.get("content"), f"messages[{i}].content")}
                              if isinstance(m, dict) else m for i, m in enumerate(data["prompt"])]
        if route == "completions" and not isinstance(data.get("prompt"), str):
            raise RequestError(f"prompt: expected one text, got {type(data.get('prompt')).__name__}")
        tokens_name = next((k for k in ("max_tokens", "max_completion_tokens") if k in body), "max_tokens")
        names = {"prompt": prompt_name, "profile": "model", "max_new_tokens": tokens_name}
        r = schema.parse(data, eng, LIMITS, names)
        options = r.options if body.get("seed") is not None else replace(
            r.options, seed=random.SystemRandom().randrange(2 ** 31))
        if options.seed + n - 1 > SEED_MAX:
            raise RequestError(f"seed: expected at most {SEED_MAX - n + 1} with n={n} (choice i uses seed + i)")
        try:
            ids = (eng.encode(r.prompt, options.max_new_tokens) if route == "chat" else
                   eng.check_ids(prompt_ids(eng.tokenizer, r.prompt, chat_template=False), options.max_new_tokens))
        except RequestError as e:
            raise RequestError(f"{prompt_name}: {e}") from None
        check_busy(eng)
    except Busy as e:
        raise ApiError(429, str(e), None, "rate_limit_exceeded") from None
    except RequestError as e:
        raise ApiError(400, str(e), _param(str(e), body)) from None
    return Job(eng, ids, options, r.panes[0], n, stream, logprobs, include_usage)


# ---- decoding ---------------------------------------------------------------------------------
async def events(ctx: Context, job: Job, request: Request):
    """(choice, TokenEvent) of the n choices as they come; every stream is closed however this
    ends: finished, failed, or the client gone (checked between tokens and while waiting)."""
    loop, inbox, streams = asyncio.get_running_loop(), asyncio.Queue(), []

    def put(item):
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the server's loop is gone
            pass

    def pump(i, stream):  # one thread per stream: Stream blocks until its next token
        try:
            for step in stream:
                put((i, step))
        except Exception as e:  # noqa: BLE001 - a failed batch, delivered to the request
            put((i, e))
        put((i, None))

    try:
        for i in range(job.n):
            stream = job.engine.stream_ids([job.ids], [Pane(job.weights)],
                                           replace(job.options, seed=job.options.seed + i))
            streams.append(stream)
            ctx.active.add(stream)
            threading.Thread(target=pump, args=(i, stream), daemon=True, name=f"genarm-api-{i}").start()
        live = job.n
        while live:
            try:
                i, item = await asyncio.wait_for(inbox.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                for ev in item:
                    yield i, ev
                if await request.is_disconnected():
                    return
    finally:
        for stream in streams:
            stream.close()
            ctx.active.discard(stream)


def _finite(x: float):
    return x if x == x and abs(x) != float("inf") else None


def token_entry(eng: Engine, ev: TokenEvent) -> dict:
    """One chosen token: its text and log-prob under the fused distribution (OpenAI's `logprob`),
    and, as extensions, its id and its log-prob under the base and each ARM."""
    token = eng.tokenizer.decode([ev.token_id])
    return {"token": token, "logprob": _finite(ev.logprob_fused), "bytes": list(token.encode()), "top_logprobs": [],
            "token_id": ev.token_id, "logprob_base": _finite(ev.logprob_base),
            "logprob_arms": {k: _finite(v) for k, v in ev.logprob_arms.items()}}


def completions_logprobs(entries: list[dict], offsets: list[int]) -> dict:
    """The legacy completions' layout of the same entries (lists per field)."""
    arms = {name: [e["logprob_arms"][name] for e in entries] for name in (entries[0]["logprob_arms"] if entries else {})}
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": None, "text_offset": offsets, "token_ids": [e["token_id"] for e in entries],
            "base_logprobs": [e["logprob_base"] for e in entries], "arm_logprobs": arms}


class Reply:
    """What one request answers, chunk by chunk or whole: the response's envelope per route."""

    def __init__(self, job: Job, route: str, prompt_tokens: int):
        self.job, self.route = job, route
        self.id = ("chatcmpl-" if route == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created, self.model = int(time.time()), job.engine.profile.name
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.texts = [""] * job.n
        self.entries: list[list[dict]] = [[] for _ in range(job.n)]
        self.offsets: list[list[int]] = [[] for _ in range(job.n)]
        self.finish: list[str | None] = [None] * job.n

    def add(self, i: int, ev: TokenEvent) -> dict | None:
        """Records one event; its choice's delta (text, logprobs, finish reason), or None."""
        if ev.token_id < 0:
            return None
        entry = token_entry(self.job.engine, ev) if self.job.logprobs else None
        if entry:
            self.entries[i].append(entry)
            self.offsets[i].append(len(self.texts[i]))
        offset = len(self.texts[i])
        self.texts[i] += ev.text
        self.completion_tokens += 1
        self.finish[i] = FINISH.get(ev.finish_reason) if ev.finish_reason else None
        return {"text": ev.text, "entry": entry, "offset": offset, "finish_reason": self.finish[i]}

    def _logprobs(self, entries: list[dict], offsets: list[int]):
        if not self.job.logprobs:
            return None
        return {"content": entries} if self.route == "chat" else completions_logprobs(entries, offsets)

    def envelope(self, choices: list, **extra) -> dict:
        kind = ("chat.completion.chunk" if self.job.stream else "chat.completion") if self.route == "chat" \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def first_chunk(self, i: int) -> dict:
        """A streamed chat choice opens with its role."""
        return self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])

    def chunk(self, i: int, delta: dict) -> dict:
        """A streamed chunk of choice i: one token's text, log-probs and finish reason."""
        e = [delta["entry"]] if delta["entry"] else []
        logprobs = self._logprobs(e, [delta["offset"]]) if e else None
        choice = {"index": i, "delta": {"content": delta["text"]}} if self.route == "chat" else \
            {"index": i, "text": delta["text"]}
        return self.envelope([{**choice, "logprobs": logprobs, "finish_reason": delta["finish_reason"]}])

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def extension(self) -> dict:
        return {"options": self.job.options.as_dict(), "weights": self.job.weights,
                "seeds": [self.job.options.seed + i for i in range(self.job.n)]}

    def whole(self) -> dict:
        choices = []
        for i in range(self.job.n):
            logprobs = self._logprobs(self.entries[i], self.offsets[i])
            if self.route == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": self.texts[i]},
                                "logprobs": logprobs, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": self.texts[i], "logprobs": logprobs,
                                "finish_reason": self.finish[i]})
        return self.envelope(choices, usage=self.usage(), genarm=self.extension())


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _streamed(ctx: Context, job: Job, reply: Reply, request: Request):
    try:
        if reply.route == "chat":
            for i in range(job.n):
                yield _sse(reply.first_chunk(i))
        async with aclosing(events(ctx, job, request)) as steps:
            async for i, ev in steps:
                delta = reply.add(i, ev)
                if delta is not None and (delta["text"] or delta["entry"] or delta["finish_reason"]):
                    yield _sse(reply.chunk(i, delta))
        if job.include_usage:
            yield _sse(reply.envelope([], usage=reply.usage(), genarm=reply.extension()))
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the status is already sent: the error goes in the stream
        yield _sse({"error": {"message": f"decoding failed: {e}", "type": "server_error", "param": None,
                              "code": None}})


async def _answer(request: Request, route: str):
    ctx = _context(request)
    try:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "body: not valid JSON") from None
        job = await run_in_threadpool(check, ctx, body, route)  # may load a profile: off the event loop
    except ApiError as e:
        return e.response()
    reply = Reply(job, route, len(job.ids))
    if job.stream:
        return StreamingResponse(_streamed(ctx, job, reply, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        async with aclosing(events(ctx, job, request)) as steps:
            async for i, ev in steps:
                reply.add(i, ev)
    except Exception as e:  # noqa: BLE001 - a failed batch
        return ApiError(500, f"decoding failed: {e}").response()
    return JSONResponse(reply.whole())


# ---- the routes -------------------------------------------------------------------------------
@router.get("/models")
def list_models(request: Request) -> dict:
    """The offered profiles (models.yaml's `demo:` list) and their ARMs: the weights' names."""
    ctx = _context(request)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "genarm", "description": p.description,
             "arms": [{"name": a.name, "label": a.label, "min": a.weight_min, "max": a.weight_max,
                       "default": a.weight_default} for a in p.arms]}
            for name, p in ctx.engines.profiles.items()]
    return {"object": "list", "data": data}


@router.post("/chat/completions")
async def chat_completions(request: Request):
    return await _answer(request, "chat")


@router.post("/completions")
async def completions(request: Request):
    return await _answer(request, "completions")


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def unknown_route(path: str):
    return ApiError(404, f"/v1/{path[:80]}: no such route (routes: GET /v1/models, POST /v1/chat/completions, "
                         "POST /v1/completions)", None, "unknown_url").response()
