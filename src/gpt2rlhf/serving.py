"""An OpenAI-compatible server for one of our models (FastAPI + uvicorn), with a web chat page.

Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (OpenAI's request and
response shapes; `stream: true` sends server-sent events, `delta` chunks then `[DONE]`),
`/health` (the batching counters) and `/`, the chat page (static/chat.html: plain HTML and
JavaScript, nothing fetched from elsewhere). Chat messages become the HH-RLHF transcript the
SFT preset trains on (chat.py), and a reply stops at the next "\\n\\nHuman:".

Batching: one thread, the `Engine`, owns the model. A request becomes a `Job` (one row per
choice) in a queue. The engine decodes all admitted rows together, one forward pass per
token for the whole batch (up to `max_batch` rows). Rows finish independently (EOS, a stop
string, `max_tokens`, the client gone) and leave the batch; requests that arrive while it
decodes are prefilled together and join it at the next step (continuous batching), instead
of waiting for the whole batch to finish. When idle, the engine waits `batch_wait` seconds
after a first request for the others sent with it. So concurrent clients share decode
steps, and throughput grows with them (BENCHMARKS.md).

Every row has its own settings and random generator (`seed` + the choice's index when a
seed is given), so a seeded request samples the same text whoever shares its batch (up to
floating-point differences that padding can make; temperature 0 is greedy). Streamed and
non-streamed replies are the same events gathered differently, so their text is the same.

Errors are OpenAI's error object `{"error": {"message", "type", "param", "code"}}`: a
malformed body 400 (FastAPI's 422 turned into 400), a missing or wrong key 401, an unknown
model 404, a body over the limit 413, too many requests in flight 429; never a stack trace.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ASSISTANT, HUMAN
from .data import left_pad
from .generation import sample_rows
from .model import KVCache
from .tokenizer import EOT_TOKEN, TextStream

log = logging.getLogger("gpt2rlhf.serving")


# ------------------------------------------------------------------ errors

class APIError(Exception):
    """An error the client caused, answered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def install_error_handlers(app: FastAPI):
    """Every error as OpenAI's error object: a body that fails validation (FastAPI answers
    422) is OpenAI's 400; Starlette's own errors (404 route, 405, 413 body) keep their
    status; anything unexpected is a 500 with a plain message, the trace only in the log."""

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request body")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", []
        elif where:
            message = f"{'.'.join(where)}: {message}"
        return APIError(400, message, param=".".join(where) or None, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return APIError(exc.status_code, str(exc.detail), code=codes.get(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("error answering %s", request.url.path)
        return APIError(500, f"internal error ({type(exc).__name__})", type="server_error").response()


class BodyLimit:
    """413 with the error object for a body over `limit` bytes: at once when Content-Length
    says so, else as soon as the bytes read pass it. (FastAPI's own `max_body_size` answers
    a too-large Content-Length with plain text, which OpenAI clients cannot read.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.too_large().response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, self.too_large().message)  # FastAPI re-raises HTTPExceptions
            return message

        await self.app(scope, counted, send)

    def too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds this server's limit of {self.limit} bytes",
                        code="request_too_large")


# ------------------------------------------------------------------ the batching engine

@dataclass
class Job:
    """One request: a row per choice (the prompt repeated n times per prompt), its sampling
    settings, and the asyncio queue its events go to: ("text", index, delta) and
    ("end", index, finish_reason, tokens generated)."""

    rows: list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_tokens: int = 0
    lstrip: bool = False  # chat: the reply's first whitespace ("Assistant: Hi") is not content
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # set by the request when its client goes; the engine drops the rows
    left: int = 0  # rows not ended yet (the engine's count)
    outbox: collections.deque = field(default_factory=collections.deque)  # events not yet handed over

    def emit(self, *event):
        """Queue an event; the engine hands a step's events to the event loop together."""
        self.outbox.append(event)

    def deliver(self):
        """Called in the event loop: the queued events, in order."""
        while self.outbox:
            self.events.put_nowait(self.outbox.popleft())


@dataclass
class Row:
    """One sequence being decoded: a choice of a job, with its own text stream and generator."""

    job: Job
    index: int
    stream: TextStream
    generator: torch.Generator
    count: int = 0  # tokens sampled
    done: bool = False


class Engine:
    """The thread that owns the model and decodes the batch of all admitted rows, one forward
    pass per token (module docstring).

    The batch is one KV cache, left-padded: every row's next token goes in the same column.
    Rows join at any step: the waiting jobs' prompts are prefilled together in a cache of
    their own, which is then laid next to the running one, both right-aligned at the same
    column (the shorter side padded on the left, masked; positions come from the mask, so
    padding never shifts them). Finished rows leave the batch at the next step; when rows join,
    the columns no remaining row uses are cut from the left, so the cache stays about as long
    as its longest row.
    A job that does not fit (`max_batch` rows, or the padded length plus the tokens still to
    come exceeding the context) waits, and so do the jobs behind it (first come, first served)."""

    def __init__(self, model, enc, max_batch: int = 32, batch_wait: float = 0.01, max_concurrent: int = 128):
        self.model, self.enc = model, enc
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        self.max_batch, self.batch_wait, self.max_concurrent = max_batch, batch_wait, max_concurrent
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: collections.deque[Job] = collections.deque()  # taken from the inbox, not yet admitted
        self.lock = threading.Lock()
        self.active = 0  # jobs admitted and not finished (the concurrency limit counts these)
        self.stats = {"steps": 0, "prefills": 0, "rows": 0, "largest_batch": 0, "tokens": 0, "cancelled_rows": 0}
        self.thread = threading.Thread(target=self._run, name="gpt2rlhf-engine", daemon=True)
        self.stopping = False

    def start(self):
        self.thread.start()

    def stop(self):
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> Job:
        """Queue a job, or 429 when `max_concurrent` are already in flight."""
        with self.lock:
            if self.active >= self.max_concurrent:
                raise APIError(429, f"the server is busy: {self.active} requests in flight (--max-concurrent "
                                    f"{self.max_concurrent}); retry shortly", type="rate_limit_error",
                               code="rate_limit_exceeded")
            self.active += 1
        job.loop, job.events, job.left = asyncio.get_running_loop(), asyncio.Queue(), len(job.rows)
        self.inbox.put(job)
        return job

    def _release(self, job: Job):
        with self.lock:
            self.active -= 1

    # -------------------------------------------------------------- the loop

    def _run(self):
        rows: list[Row] = []
        cache, logits, admit = None, None, []
        while not self.stopping:
            try:
                self._receive(block=not rows)
                if self.stopping:
                    break
                rows, cache, logits = self._drop_ended(rows, cache, logits)
                admit = self._admissible(rows, cache)
                if admit:
                    rows, cache, logits = self._admit(admit, rows, cache, logits)
                    admit = []
                if rows:
                    logits = self._step(rows, cache, logits)
                self._hand_over(rows, admit)
            except Exception as e:  # noqa: BLE001 - one failed step must not stop the server
                log.exception("decoding failed")
                message = f"generation failed ({type(e).__name__})"
                for row in rows:
                    if not row.done:
                        row.job.emit("error", row.index, message)
                        self._end_row(row)
                for job in admit:  # taken from the queue, not yet rows
                    job.emit("error", 0, message)
                    self._release(job)
                self._hand_over(rows, admit)
                rows, cache, logits, admit = [], None, None, []

    @staticmethod
    def _hand_over(rows: list[Row], jobs: list[Job]):
        """Give each job's queued events to its event loop: one wake-up per job and step, not
        one per token (the engine thread and the event loop share the interpreter)."""
        for job in {id(j): j for j in [r.job for r in rows] + list(jobs)}.values():
            if job.outbox:
                job.loop.call_soon_threadsafe(job.deliver)

    def _receive(self, block: bool):
        """Move what arrived into `waiting`; when idle, wait for a job and then `batch_wait`
        seconds for the jobs sent at about the same time."""
        def put(job):
            if job is None:
                self.stopping = True
            else:
                self.waiting.append(job)
        if block and not self.waiting:
            put(self.inbox.get())
            deadline = time.monotonic() + self.batch_wait
            while not self.stopping and (left := deadline - time.monotonic()) > 0 and \
                    sum(len(j.rows) for j in self.waiting) < self.max_batch:
                try:
                    put(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        while not self.stopping:
            try:
                put(self.inbox.get_nowait())
            except queue.Empty:
                break

    def _admissible(self, rows: list[Row], cache: KVCache | None) -> list[Job]:
        """The waiting jobs that join the batch now, first come first served."""
        n, used = len(rows), self._used_length(cache)
        still = max((r.job.max_tokens - r.count for r in rows), default=0)
        admit = []
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                self._release(job)
                continue
            longest = max(used, max(len(p) for p in job.rows))
            still_after = max(still, job.max_tokens)
            if n + len(job.rows) > self.max_batch or longest + still_after > self.block_size:
                break  # checked alone when the request came, so it fits once the batch drains
            admit.append(self.waiting.popleft())
            n, used, still = n + len(job.rows), longest, still_after
        return admit

    @staticmethod
    def _used_length(cache: KVCache | None) -> int:
        """Columns of the cache from the first one a row uses to the end of what is written."""
        if cache is None:
            return 0
        used = cache.mask[:, :cache.pos].any(dim=0).nonzero()
        return cache.pos - int(used[0]) if len(used) else 0

    def _drop_ended(self, rows, cache, logits):
        """The batch without its ended rows (a client gone counts as ended)."""
        for row in rows:
            if row.job.cancelled and not row.done:
                self.stats["cancelled_rows"] += 1
                self._end_row(row)
        keep = [i for i, row in enumerate(rows) if not row.done]
        if len(keep) == len(rows):
            return rows, cache, logits
        if not keep:
            return [], None, None
        index = torch.tensor(keep, device=self.device)
        for layer in range(cache.n_layer):
            cache.k[layer], cache.v[layer] = cache.k[layer][index], cache.v[layer][index]
        cache.mask = cache.mask[index]
        return [rows[i] for i in keep], cache, logits[index]

    @torch.no_grad()
    def _admit(self, jobs: list[Job], rows: list[Row], cache: KVCache | None, logits):
        """Prefill the jobs' prompts and lay their cache next to the running one."""
        new_rows = []
        for job in jobs:
            for i in range(len(job.rows)):
                g = torch.Generator(self.device)
                g.manual_seed((job.seed + i) % 2 ** 63 if job.seed is not None else secrets.randbits(63))
                new_rows.append(Row(job, i, TextStream(self.enc, job.stop, job.lstrip), g))
        ids, mask = left_pad([p for job in jobs for p in job.rows], EOT_TOKEN)
        ids, mask = ids.to(self.device), mask.to(self.device)
        fresh = KVCache(self.model.config, ids.size(0), ids.size(1), device=self.device)
        new_logits = self.model(ids, attention_mask=mask, cache=fresh, last_only=True)[:, -1]
        rows = rows + new_rows
        still = max(r.job.max_tokens - r.count for r in rows)
        cache = self._side_by_side(cache, fresh, still)
        self.stats["prefills"] += 1
        self.stats["rows"] += len(new_rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        return rows, cache, new_logits if logits is None else torch.cat([logits, new_logits])

    def _side_by_side(self, old: KVCache | None, new: KVCache, room: int) -> KVCache:
        """One cache: the rows of `old` (its unused left columns cut) then those of `new`,
        right-aligned at a shared column, with room for `room` more tokens."""
        if old is None:
            old_len, first, B_old = 0, 0, 0
        else:
            old_len, B_old = self._used_length(old), old.mask.size(0)
            first = old.pos - old_len
        pos = max(old_len, new.pos)
        cache = KVCache(self.model.config, B_old + new.mask.size(0), pos + room, device=self.device)
        cache.mask[:B_old, pos - old_len:pos] = old.mask[:, first:old.pos] if old is not None else False
        cache.mask[B_old:, pos - new.pos:pos] = new.mask[:, :new.pos]
        for layer in range(cache.n_layer):
            for mine, theirs_old, theirs_new in ((cache.k, old and old.k, new.k), (cache.v, old and old.v, new.v)):
                B, nh, _, hs = theirs_new[layer].shape
                buf = theirs_new[layer].new_zeros(B_old + B, nh, pos + room, hs)
                if old is not None:
                    buf[:B_old, :, pos - old_len:pos] = theirs_old[layer][:, :, first:old.pos]
                buf[B_old:, :, pos - new.pos:pos] = theirs_new[layer][:, :, :new.pos]
                mine[layer] = buf
        cache.pos = pos
        return cache

    @torch.no_grad()
    def _step(self, rows: list[Row], cache: KVCache, logits) -> torch.Tensor:
        """Sample one token for every row, send what became text, end the rows that are
        done, then run the batch's tokens through the model: the next logits."""
        jobs = [r.job for r in rows]
        logits = logits[:, :self.enc.n_vocab]  # a vocabulary padded past the tokenizer's: never sampled
        young = [i for i, r in enumerate(rows) if r.count < r.job.min_tokens]
        if young:
            logits = logits.clone()
            logits[young, EOT_TOKEN] = float("-inf")  # min_tokens: no EOS yet
        tokens = sample_rows(logits, [j.temperature for j in jobs], [j.top_k for j in jobs],
                             [j.top_p for j in jobs], [r.generator for r in rows])
        self.stats["steps"] += 1
        for row, token in zip(rows, tokens.tolist()):
            row.count += 1
            self.stats["tokens"] += 1
            if token == EOT_TOKEN:
                self._end_row(row, "stop")
                continue
            if text := row.stream.push(token):
                row.job.emit("text", row.index, text)
            if row.stream.stopped:
                self._end_row(row, "stop")
            elif row.count >= row.job.max_tokens:
                self._end_row(row, "length")
        if all(row.done for row in rows):
            return logits  # the batch is dropped before the next step
        step_mask = torch.ones(len(rows), 1, dtype=torch.long, device=self.device)
        return self.model(tokens[:, None], attention_mask=step_mask, cache=cache)[:, -1]

    def _end_row(self, row: Row, reason: str | None = None):
        """A row ends: its held-back text and its end event (none for a client gone)."""
        row.done = True
        if reason is not None:
            if text := row.stream.flush():
                row.job.emit("text", row.index, text)
            row.job.emit("end", row.index, reason, row.count)
        row.job.left -= 1
        if row.job.left == 0:
            self._release(row.job)


# ------------------------------------------------------------------ the OpenAI request bodies

class CompletionRequest(BaseModel):
    model: str
    min_tokens: int | None = Field(None, ge=0)
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension; 0: off
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    user: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]  # a string, or OpenAI's list of content parts (text only)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    model: str
    min_tokens: int | None = Field(None, ge=0)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    user: str | None = None


def transcript(messages: list[Message]) -> str:
    """Chat messages as the HH-RLHF transcript, ending where the assistant's reply begins.
    System messages (HH has none) go first, as plain text."""
    text = "\n\n".join(m.text.strip() for m in messages if m.role in ("system", "developer"))
    for m in messages:
        if m.role not in ("system", "developer"):
            text += f"{HUMAN if m.role == 'user' else ASSISTANT} {m.text.strip()}"
    return text + ASSISTANT


# ------------------------------------------------------------------ the app

@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 32
    batch_wait: float = 0.01
    max_concurrent: int = 128
    max_tokens_limit: int = 512
    max_prompt_tokens: int = 0  # 0: the context less one token
    max_body_bytes: int = 1_000_000


def build_app(model, enc, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `model` (on its device, in eval mode) under `settings.model_name`."""
    engine = Engine(model, enc, settings.max_batch, settings.batch_wait, settings.max_concurrent)
    block = model.config.block_size
    max_prompt = min(settings.max_prompt_tokens or block - 1, block - 1)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="gpt2rlhf", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "a valid API key is needed: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    def check_model(name: str):
        if name != settings.model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server has `{settings.model_name}`",
                           param="model", code="model_not_found")

    def make_job(prompts: list[list[int]], body, default_max: int | None, chat: bool) -> Job:
        """The job of a request, its limits checked (400 naming the parameter)."""
        n = body.n or 1
        if n * len(prompts) > settings.max_batch:
            raise APIError(400, f"n x prompts = {n * len(prompts)} exceeds this server's batch of "
                                f"{settings.max_batch} sequences", param="n")
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if longest > max_prompt:
            raise APIError(400, f"the prompt is {longest} tokens; this model takes at most {max_prompt} "
                                f"(context {block})", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                           param="max_tokens")
        if max_tokens is None:
            max_tokens = min(default_max or settings.max_tokens_limit, settings.max_tokens_limit, block - longest)
        if longest + max_tokens > block:
            raise APIError(400, f"this model's context is {block} tokens; the prompt ({longest}) plus max_tokens "
                                f"({max_tokens}) exceed it: lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        return engine.submit(Job(rows=[p for p in prompts for _ in range(n)], max_tokens=max_tokens,
                                 temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                                 top_k=body.top_k or 0, stop=stop + ([HUMAN] if chat else []), seed=body.seed,
                                 min_tokens=min(body.min_tokens or 0, max_tokens), lstrip=chat))

    async def events(job: Job):
        """The job's events until every row has ended; the job is cancelled if the request
        goes away first (a client that disconnects frees its rows at the next step)."""
        left = len(job.rows)
        try:
            while left:
                event = await job.events.get()
                if event[0] == "error":
                    raise APIError(500, event[2], type="server_error")
                left -= event[0] == "end"
                yield event
        finally:
            job.cancelled = left > 0

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def respond(job: Job, body, prompt_tokens: int, kind: Literal["text", "chat"], request=None):
        """The whole answer as one JSON object, or (stream) its events as SSE chunks."""
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": settings.model_name}

        def choice(i, text=None, reason=None, first=False):
            if kind == "text":
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

        if body.stream:
            chunk_head = head | ({"object": "chat.completion.chunk"} if kind == "chat" else {})
            with_usage = bool((body.stream_options or {}).get("include_usage"))

            async def stream():
                def sse(obj):
                    return format_sse_event(data_str=json.dumps(obj))
                generated = 0
                if kind == "chat":
                    for i in range(len(job.rows)):
                        yield sse(chunk_head | {"choices": [choice(i, first=True)]})
                try:
                    async for event in events(job):
                        if event[0] == "text":
                            yield sse(chunk_head | {"choices": [choice(event[1], event[2])]})
                        else:
                            generated += event[3]
                            yield sse(chunk_head | {"choices": [choice(event[1], reason=event[2])]})
                except APIError as e:  # the status is sent already: the error goes in the stream
                    yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                    return
                if with_usage:
                    yield sse(chunk_head | {"choices": [], "usage": usage(prompt_tokens, generated)})
                yield format_sse_event(data_str="[DONE]")

            return EventSourceResponse(stream(), headers={"Cache-Control": "no-cache"})

        texts, reasons, generated = [""] * len(job.rows), [None] * len(job.rows), 0

        async def watch():  # a client that goes away frees its rows at the next decode step
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled = True

        watcher = asyncio.create_task(watch()) if request is not None else None
        try:
            async for event in events(job):
                if event[0] == "text":
                    texts[event[1]] += event[2]
                else:
                    reasons[event[1]] = event[2]
                    generated += event[3]
        finally:
            if watcher is not None:
                watcher.cancel()
        if kind == "text":
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        return head | {"choices": choices, "usage": usage(prompt_tokens, generated)}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "gpt2rlhf", "context_length": block}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        encoded = [enc.encode(p, disallowed_special=()) for p in prompts]
        job = make_job(encoded, body, 16, chat=False)  # 16: OpenAI's default max_tokens for completions
        return await respond(job, body, sum(len(p) for p in encoded), "text", request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        prompt = enc.encode(transcript(body.messages), disallowed_special=())
        job = make_job([prompt], body, None, chat=True)
        return await respond(job, body, len(prompt), "chat", request)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "in_flight": engine.active, **engine.stats}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("gpt2rlhf").joinpath("static/chat.html").read_text()

    return app
