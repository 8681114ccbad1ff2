"""The HTTP side of ``otter-gguf serve``: an OpenAI-compatible FastAPI app (docs/SERVE.md).

Built on llama-cpp-python's server stack (FastAPI, uvicorn, sse-starlette;
its request models from ``llama_cpp.server.types``), but with its own
response path: llama-cpp-python's TypedDict response models would drop the
``otter`` field, and its server serialises requests behind one lock. Here each
request becomes an :class:`~otter_gguf.server.engine.Job` of the continuous-
batching :class:`~otter_gguf.server.engine.Engine`; the handler awaits the
job's events (a streamed response relays them as server-sent events).

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``
with 400 (malformed request), 401 (API key), 404 (unknown path), 413 (body too
large), 503 (queue full, with ``Retry-After``). A request's ``model`` may be any
name (the one model is served, as llama-server and llama-cpp-python's server
do); ``<served name>:<head>`` chooses heads (:mod:`otter_gguf.server.heads`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sys
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional

import llama_cpp
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from otter_gguf.runtime import backends, guided
from otter_gguf.runtime.guidance import Guidance
from otter_gguf.runtime.score import OtterScore, check_tokens
from otter_gguf.server.engine import Delta, Done, Engine, Failed, Job, QueueFull, Sampling
from otter_gguf.server import chat
from otter_gguf.server.chat import ToolStream, parse_tool_calls
from otter_gguf.server.heads import HeadSelection, model_heads, select
from otter_gguf.server.logprobs import to_chat
from otter_gguf.server.metrics import Metrics
from otter_gguf.server.model import ServeConfig, load_drafter
from otter_gguf.server.protocol import (
    ChatRequest,
    CompletionRequest,
    OtterOptions,
    RequestError,
    ScoreRequest,
    check_sampling,
    draft_max,
    grammar,
    logit_bias,
    logprobs_n,
    stop_list,
)

__all__ = ["create_app", "Server"]


def _error(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
           headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": status}},
                        status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = _error(413, f"request body exceeds this server's limit of {self.limit} bytes "
                              f"(--max-request-bytes)", param=None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise RequestError("request body too large", status=413)
            return msg

        try:
            await self.app(scope, limited, send)
        except RequestError:
            await too_big(scope, receive, send)


#: how long a request answered by :meth:`Server.report_aborts` has to reach its client before the process ends
ABORT_FLUSH_S = 1.0


class Server:
    """One served model: the engine, its chat template, metrics and the request -> job logic."""

    def __init__(self, cfg: ServeConfig, llm: Any):
        self.cfg = cfg
        self.llm = llm
        self.name = cfg.name
        self.metrics = Metrics()
        drafter, n_draft = load_drafter(cfg, llm)
        self.engine = Engine(llm, parallel=cfg.parallel, ctx_per_seq=cfg.ctx_size, queue_size=cfg.queue_size,
                             on_step=self._on_step, cache_prompt=cfg.cache_prompt, drafter=drafter,
                             draft_max=n_draft)
        self.formatter = self._chat_formatter()
        self._template_tools: Optional[bool] = None  # the chat template renders tools (found on first use)
        m, e = self.metrics, self.engine
        m.gauge("queue_depth", "requests waiting for a sequence", lambda: e.queue_depth)
        m.gauge("requests_processing", "requests holding sequences", lambda: e.active)
        m.gauge("sequences_free", "free sequences of the pool", lambda: e.free_sequences)
        m.gauge("sequences_total", "sequences of the pool (--parallel)", lambda: cfg.parallel)
        m.gauge("prompt_tokens_total", "prompt tokens decoded", lambda: e.prompt_tokens, kind="counter")
        m.gauge("generated_tokens_total", "tokens generated", lambda: e.generated_tokens, kind="counter")
        m.gauge("batch_tokens_total", "tokens decoded in batches (candidates included)", lambda: e.tokens_decoded,
                kind="counter")
        m.gauge("draft_tokens_total", "draft tokens verified (speculative decoding)", lambda: e.drafted_tokens,
                kind="counter")
        m.gauge("draft_accepted_total", "draft tokens kept (speculative decoding)", lambda: e.accepted_tokens,
                kind="counter")
        m.gauge("prompt_cache_tokens_total", "prompt tokens reused from the prompt cache", lambda: e.cached_tokens,
                kind="counter")
        m.gauge("decode_steps_total", "llama_decode calls", lambda: e.steps, kind="counter")
        m.gauge("batch_sequences_peak", "most requests decoded in one step since the start", lambda: e.peak_sequences)

    def report_aborts(self) -> None:
        """When ggml aborts the process (with ``--rpc``: an RPC server that crashed or closed the
        connection, ``Remote RPC server crashed or returned malformed response``), answer every
        request in flight with a 502 naming the RPC servers and ggml's message, log it, and give
        the answers :data:`ABORT_FLUSH_S` to leave before the process ends (llama.cpp cannot go
        on without the server: its RPC client aborts)."""
        servers = self.cfg.offload.get("rpc_servers", "")

        def hook(message: str) -> None:
            why = re.sub(r"^\S+:\d+: ", "", message.strip())  # ggml's message without its source file:line
            text = (f"llama.cpp aborted ({why}); the RPC servers of this model are --rpc {servers}: "
                    "one of them crashed or closed the connection, and otter-gguf serve exits")
            print(f"otter-gguf serve: error: {text}", file=sys.stderr, flush=True)
            self.engine.fail_all(502, text)
            time.sleep(ABORT_FLUSH_S)

        backends.on_abort(hook)

    def _on_step(self, n_tokens: int, seconds: float) -> None:
        self.metrics.observe("decode_step_seconds", "duration of one batched decode step", seconds)

    def _chat_formatter(self) -> Optional[Jinja2ChatFormatter]:
        """The GGUF's chat template, set up as llama-cpp-python's Llama does."""
        llm = self.llm
        template = self.cfg.chat_template or (llm.metadata or {}).get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = llm.token_eos(), llm.token_bos()
        return Jinja2ChatFormatter(template=template,
                                   eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                                   bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                                   stop_token_ids=[eos])

    # ------------------------------------------------------------------
    # requests -> jobs
    # ------------------------------------------------------------------
    def _draft_max(self, req: Any, guidance: Any) -> Optional[int]:
        n = draft_max(req, self.engine.draft_max)
        if guidance is not None and guidance.batched:
            if req.speculative is not None and req.speculative is not False and n != 0:
                raise RequestError(f"speculative: guidance on a scalar reward signal scores top_k={guidance.top_k} "
                                   f"candidates as parallel sequences each step, so there is no single draft to "
                                   f"verify; use a token_reward head's signal, or speculative: false",
                                   param="speculative")
            return 0
        return n

    def served_names(self) -> List[str]:
        """The names a model id may start with: the alias (or file name), then the path given."""
        return list(dict.fromkeys([self.name, self.cfg.model]))

    def model_id(self, model: Optional[str]) -> str:
        """The model id a response names: the served name, or the ``name:heads`` id the request used."""
        return model if model_heads(model, self.served_names()) is not None else self.name

    def _heads(self, model: Optional[str], opts: OtterOptions) -> Optional[HeadSelection]:
        """The heads a request chose (model id ``name:heads`` or ``otter.heads``), None for all."""
        by_id = model_heads(model, self.served_names())
        asked = opts.heads
        if by_id is None and asked is None:
            return None
        param = "otter.heads" if asked is not None else "model"
        if by_id is not None and asked is not None and sorted(by_id) != sorted(asked):
            raise RequestError(f"the model id {model!r} names the heads {', '.join(by_id)} but otter.heads names "
                               f"{', '.join(asked)}: give one of them", param="otter.heads")
        if not self.llm.has_otter:
            raise RequestError(f"{param}: the model {self.name} has no Otter head", param=param)
        try:
            sel = select(self.llm.otter_heads, asked if asked is not None else by_id)
        except ValueError as e:
            raise RequestError(f"{param}: {e}", param=param) from None
        return None if sel.all else sel

    def _otter(self, model: Optional[str], opts: Optional[OtterOptions]):
        opts = opts or OtterOptions()
        llm = self.llm
        heads = self._heads(model, opts)
        guidance = None
        if opts.guidance is not None:
            if not llm.has_otter:
                raise RequestError(f"otter.guidance: the model {self.name} has no Otter head", param="otter.guidance")
            if not opts.side_stream:
                raise RequestError("otter.guidance needs the side stream (otter.side_stream must not be false)",
                                   param="otter.side_stream")
            try:
                spec = opts.guidance if heads is None else heads.guidance(opts.guidance)
                g = Guidance.coerce(spec)
                guidance = guided.resolve(g, llm)
            except ValueError as e:
                raise RequestError(f"otter.guidance: {e}", param="otter.guidance") from None
            if guidance.batched and guidance.top_k + 1 > self.cfg.parallel:
                raise RequestError(f"otter.guidance: top_k={guidance.top_k} scores the candidates as "
                                   f"{guidance.top_k} parallel sequences and needs {guidance.top_k + 1} sequences; "
                                   f"this server has --parallel {self.cfg.parallel}", param="otter.guidance")
        if opts.full_signals and llm.head_kind != "token_reward":
            if not llm.has_otter:
                raise RequestError(f"otter.full_signals: the model {self.name} has no Otter head",
                                   param="otter.full_signals")
        return guidance, bool(opts.full_signals), bool(opts.side_stream and llm.has_otter), heads

    def _tokens(self, prompt: Any) -> List[int]:
        """A completion prompt's tokens, as ``Llama._create_completion`` makes them."""
        llm = self.llm
        if isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
            if len(prompt) != 1:
                raise RequestError("one prompt per request (a list of several prompts is not supported)",
                                   param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty", param="prompt")
            bos = llm.token_bos()
            head = [bos] if llm._model.add_bos_token() and bos != -1 else []
            return head + llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        toks = list(prompt)
        if not toks:
            raise RequestError("prompt is empty", param="prompt")
        bad = [t for t in toks if not 0 <= t < llm._n_vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{llm._n_vocab - 1})",
                               param="prompt")
        return toks

    def _max_tokens(self, requested: Optional[int], n_prompt: int) -> int:
        ctx = self.cfg.ctx_size
        if n_prompt >= ctx:
            raise RequestError(f"the prompt has {n_prompt} tokens; this server's context per request is {ctx} "
                               f"(--ctx-size)", param="prompt")
        if requested is None or requested <= 0:
            requested = min(self.cfg.max_tokens_limit, ctx - n_prompt)
        return requested if requested + n_prompt < ctx else ctx - n_prompt

    def completion_jobs(self, req: Any, tokens: List[int], stops: List[str], sinks, echo: str = "",
                        prompt_text: str = "", tool_grammar: Optional[str] = None) -> List[Job]:
        """The jobs of a request's ``n`` choices: each its own sequence of the pool, sampled with
        seed ``seed + i`` (a random seed each without one)."""
        if len(sinks) > self.cfg.queue_size:
            raise RequestError(f"n={len(sinks)} choices exceed this server's queue of {self.cfg.queue_size} "
                               f"(--queue-size)", param="n")
        jobs = [self.completion_job(req, tokens, stops, sinks[0], echo=echo, prompt_text=prompt_text,
                                    tool_grammar=tool_grammar)]
        for i, sink in enumerate(sinks[1:], 1):
            seed = jobs[0].sampling.seed
            jobs.append(dataclasses.replace(
                jobs[0], sink=sink, sampling=dataclasses.replace(
                    jobs[0].sampling, seed=None if seed is None else (seed + i) % 2 ** 32)))
        return jobs

    def completion_job(self, req: Any, tokens: List[int], stops: List[str], sink, echo: str = "",
                       prompt_text: str = "", tool_grammar: Optional[str] = None) -> Job:
        check_sampling(req, max_tokens_limit=self.cfg.max_tokens_limit)
        guidance, full, side, heads = self._otter(req.model, req.otter)
        gbnf = grammar(req, tool_grammar)
        if gbnf:
            # llama-cpp-python parses a grammar only when its sampler is made (NULL on error, which
            # would crash the chain): try it here
            smpl = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, gbnf.encode("utf-8"), b"root")
            if not smpl:
                param = "grammar" if req.grammar else "tools" if tool_grammar else "response_format"
                raise RequestError(f"{param}: llama.cpp cannot parse this GBNF grammar (rule 'root')", param=param)
            llama_cpp.llama_sampler_free(smpl)
        sp = Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                      repeat_penalty=req.repeat_penalty, frequency_penalty=req.frequency_penalty or 0.0,
                      presence_penalty=req.presence_penalty or 0.0, mirostat_mode=req.mirostat_mode,
                      mirostat_tau=req.mirostat_tau, mirostat_eta=req.mirostat_eta,
                      seed=req.seed if req.seed is not None else self.cfg.seed,
                      grammar=gbnf, logit_bias=logit_bias(req, self.llm._n_vocab))
        return Job(kind="completion", prompt_tokens=tokens, sink=sink,
                   max_tokens=self._max_tokens(req.max_tokens, len(tokens)),
                   stop=[s.encode("utf-8") for s in stops], stream=req.stream, sampling=sp, guidance=guidance,
                   full_signals=full, side_stream=side, echo_prefix=echo, heads=heads,
                   logprobs=logprobs_n(req, self.llm._n_vocab), text_base=len(prompt_text),
                   cache_prompt=req.cache_prompt, draft_max=self._draft_max(req, guidance))

    def chat_prompt(self, req: ChatRequest) -> chat.ChatPrompt:
        """The rendered chat (server.chat: messages checked, tools in the prompt, a required call's grammar)."""
        if self.formatter is None:
            raise RequestError(f"the model {self.name} has no chat template (tokenizer.chat_template); "
                               f"use /v1/completions or --chat-template-file", param="messages")
        tools, choice = req.tools, req.tool_choice
        if req.functions is not None:  # the deprecated form, as llama-cpp-python converts it
            if tools is not None:
                raise RequestError("give one of tools and functions", param="functions")
            tools = [{"type": "function", "function": f} for f in req.functions]
            fc = req.function_call
            choice = fc if isinstance(fc, str) else ({"type": "function", "function": fc} if fc else None)
        try:
            msgs = chat.normalize(req.messages)
            if self._template_tools is None:
                self._template_tools = chat.supports_tools(self.formatter)
            return chat.render(self.formatter, msgs, tools, choice, template_tools=self._template_tools)
        except chat.ChatError as e:
            raise RequestError(str(e), param=e.param) from None

    def score_job(self, req: ScoreRequest, sink) -> Job:
        llm = self.llm
        if not llm.has_otter:
            raise RequestError(f"the model {self.name} has no Otter head: nothing to score")
        if (req.text is None) == (req.tokens is None):
            raise RequestError("give exactly one of text and tokens", param="text")
        toks = (llm.tokenize(req.text.encode("utf-8"), add_bos=req.add_bos, special=req.special)
                if req.text is not None else list(req.tokens))
        try:
            check_tokens(toks, llm._n_vocab, self.cfg.ctx_size)
        except ValueError as e:
            raise RequestError(str(e), param="tokens" if req.tokens is not None else "text") from None
        return Job(kind="score", prompt_tokens=toks, sink=sink, side_stream=True)

    def score_body(self, toks: List[int], signals) -> dict:
        llm = self.llm
        texts = [llm.detokenize([t], prev_tokens=toks[:i]).decode("utf-8", errors="ignore")
                 for i, t in enumerate(toks)]
        s = OtterScore(tokens=toks, signals=signals, signal_names=llm.signal_names, head_kind=llm.head_kind,
                       token_texts=texts, layout=llm._otter_src.layout)
        body = {"object": "otter.score", "model": self.name, **s.to_dict(), "head_kind": s.head_kind,
                "token_texts": texts}
        if s.head_kind == "token_reward":
            body["token_rewards"] = [None if v != v else float(v) for v in s.token_rewards.tolist()]
        else:
            body["rewards"] = [dict(zip(s.signal_names, row)) for row in body["signals"]]
        return body

    def models(self) -> dict:
        """``GET /v1/models``: the served model, and with several heads one ``name:head`` id per head."""
        llm = self.llm
        info: Dict[str, Any] = {"object": "model", "id": self.name, "owned_by": "otter-gguf", "permissions": [],
                                "created": 0}
        data = [info]
        if llm.has_otter:
            heads = [{"name": h.name, "head_kind": h.head_kind, "n_out": h.n_out, "signal_names": list(h.signal_names)}
                     for h in llm.otter_heads]  # the model's own head, then the --head adapters
            info["otter"] = {"head_kind": llm.head_kind, "n_out": llm.n_out, "signal_names": llm.signal_names,
                             "heads": heads}
            if len(heads) > 1:
                data += [{"object": "model", "id": f"{self.name}:{h['name']}", "owned_by": "otter-gguf",
                          "permissions": [], "created": 0, "parent": self.name, "otter": {"heads": [h]}}
                         for h in heads]
        return {"object": "list", "data": data}


def create_app(cfg: ServeConfig, llm: Any = None) -> FastAPI:
    """The app serving ``cfg.model`` (or an already loaded ``llm``). The engine
    thread starts with the app (lifespan) and stops with it."""
    from contextlib import asynccontextmanager

    from otter_gguf.server.model import load_model

    if llm is None:
        llm = load_model(cfg)
    srv = Server(cfg, llm)

    @asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        if cfg.offload.get("rpc_servers"):
            srv.report_aborts()
        try:
            yield
        finally:
            if cfg.offload.get("rpc_servers"):
                backends.on_abort(None)
            srv.engine.stop()

    app = FastAPI(title="otter-gguf serve", version="1", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes)
    m = srv.metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                            for e in errs)
        m.counter("requests_total", "requests answered", endpoint=request.url.path, status="400")
        return _error(400, msg, param=loc or None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        m.counter("requests_total", "requests answered", endpoint=request.url.path, status=str(exc.status))
        headers = {"Retry-After": str(cfg.retry_after_s)} if exc.status == 503 else None
        return _error(exc.status, str(exc), type=exc.type, param=exc.param, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404
                      else "invalid_request_error")

    async def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != cfg.api_key:
            raise RequestError("invalid or missing API key (Authorization: Bearer <key>)", status=401,
                               type="authentication_error")

    v1 = [Depends(authorize)]

    @app.get("/health")
    async def health():
        e = srv.engine
        return {"status": "ok", "model": srv.name, "slots_idle": e.free_sequences,
                "slots_processing": e.active, "queue_depth": e.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return srv.models()

    def submit(jobs: List[Job], endpoint: str) -> None:
        try:
            srv.engine.submit(*jobs)
        except QueueFull as e:
            raise RequestError(f"server busy: {e}; retry later", status=503, type="server_busy") from None
        except ValueError as e:
            raise RequestError(str(e)) from None

    def channel(n: int = 1):
        """A queue of ``(choice index, event)`` and one sink per choice."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink_of(i: int):
            def sink(ev):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, (i, ev))
                except RuntimeError:  # the loop is gone (shutdown)
                    pass
            return sink

        return q, [sink_of(i) for i in range(n)]

    def cancel(jobs: List[Job]) -> None:
        for j in jobs:
            j.cancel()

    async def wait_done(request: Request, jobs: List[Job], q: asyncio.Queue) -> Optional[List[Any]]:
        """The last event of every job (None: the client went away); a failure ends the wait."""
        done: List[Any] = [None] * len(jobs)
        while any(d is None for d in done):
            try:
                i, ev = await asyncio.wait_for(q.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(jobs)
                    return None
                continue
            if isinstance(ev, Failed):
                cancel(jobs)
                return [ev]
            if isinstance(ev, Done):
                done[i] = ev
        return done

    def finish(endpoint: str, t0: float, ev: Any) -> None:
        status = "200" if isinstance(ev, Done) else str(ev.status) if isinstance(ev, Failed) else "499"
        m.counter("requests_total", "requests answered", endpoint=endpoint, status=status)
        m.observe("request_latency_seconds", "request latency (submit to last byte)", time.monotonic() - t0)
        if isinstance(ev, Done):
            if ev.first_token_s is not None:
                m.observe("time_to_first_token_seconds", "submit to first generated token", ev.first_token_s)

    def usage(evs: List[Done]) -> dict:
        """The request's usage: the prompt once, the tokens of every choice."""
        p, c = evs[0].prompt_tokens, sum(e.completion_tokens for e in evs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": evs[0].cached_tokens}}

    def with_otter(choice: dict, block: Optional[dict], job: Job) -> dict:
        if job.side_stream:
            choice["otter"] = block
        return choice

    def failed(ev: Failed) -> JSONResponse:
        return _error(ev.status, ev.message, type="server_error" if ev.status >= 500 else "invalid_request_error")

    async def run(request: Request, jobs: List[Job], q: asyncio.Queue, endpoint: str, chat: bool, model: str,
                  tools: bool = False):
        t0 = time.monotonic()
        submit(jobs, endpoint)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not jobs[0].stream:
            evs = await wait_done(request, jobs, q)
            finish(endpoint, t0, evs[-1] if evs else None)
            if evs is None:
                return _error(499, "client closed the request")
            if isinstance(evs[0], Failed):
                return failed(evs[0])
            choices = []
            for i, (ev, job) in enumerate(zip(evs, jobs)):
                msg: Dict[str, Any] = {"role": "assistant", "content": ev.text}
                reason = ev.finish_reason
                if tools:
                    msg["content"], calls = parse_tool_calls(ev.text)
                    if calls:
                        msg["tool_calls"], reason = calls, "tool_calls"
                choice = ({"index": i, "message": msg, "logprobs": to_chat(ev.logprobs), "finish_reason": reason}
                          if chat else
                          {"text": ev.text, "index": i, "logprobs": ev.logprobs, "finish_reason": ev.finish_reason})
                choices.append(with_otter(choice, ev.otter, job))
            return JSONResponse({"id": cid, "object": obj, "created": created, "model": model,
                                 "choices": choices, "usage": usage(evs)})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, text: Optional[str], block, reason, role: bool = False, lp: Optional[dict] = None,
                  calls: Optional[list] = None) -> str:
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                if calls:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                c = {"index": i, "delta": delta, "logprobs": to_chat(lp), "finish_reason": reason}
            else:
                c = {"text": text or "", "index": i, "logprobs": lp, "finish_reason": reason}
            return json.dumps({"id": cid, "object": chunk_obj, "created": created, "model": model,
                               "choices": [with_otter(c, block, jobs[i])]})

        held = [ToolStream() for _ in jobs] if tools else None  # content from a tool call on is held back

        async def events() -> AsyncIterator[dict]:
            last: Any = None
            left = len(jobs)
            try:
                if chat:
                    for i in range(len(jobs)):
                        yield {"data": chunk(i, None, None, None, role=True)}
                while left:
                    i, ev = await q.get()
                    if isinstance(ev, Delta):
                        text = held[i].push(ev.text) if held else ev.text
                        yield {"data": chunk(i, text, ev.otter, None, lp=ev.logprobs)}
                    elif isinstance(ev, Done):
                        text, calls, reason = ev.text, None, ev.finish_reason
                        if held:
                            shown = held[i].push(ev.text)
                            rest, calls = held[i].finish()
                            text = shown + rest
                            reason = "tool_calls" if calls else reason
                        yield {"data": chunk(i, text, ev.otter, reason, lp=ev.logprobs, calls=calls)}
                        left -= 1
                        last = ev
                    else:
                        last = ev
                        yield {"data": json.dumps({"error": {"message": ev.message, "type": "server_error",
                                                             "param": None, "code": ev.status}})}
                        break
                yield {"data": "[DONE]"}
            finally:
                if left:
                    cancel(jobs)  # client gone mid-stream (or a choice failed): free the sequences at the next step
                finish(endpoint, t0, last if (isinstance(last, Failed) or not left) else None)

        return EventSourceResponse(events(), sep="\n", ping=600)

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request, body: CompletionRequest):
        if body.suffix is not None:
            raise RequestError("suffix is not supported", param="suffix")
        if body.echo and body.stream:
            raise RequestError("echo is not supported with stream", param="echo")
        tokens = srv._tokens(body.prompt)
        q, sinks = channel(body.n or 1)
        text = body.prompt if isinstance(body.prompt, str) else (
            body.prompt[0] if body.prompt and isinstance(body.prompt[0], str) else
            srv.llm.detokenize(tokens).decode("utf-8", errors="ignore"))
        jobs = srv.completion_jobs(body, tokens, stop_list(body.stop), sinks, echo=text if body.echo else "",
                                   prompt_text=text)
        return await run(request, jobs, q, "/v1/completions", chat=False, model=srv.model_id(body.model))

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(request: Request, body: ChatRequest):
        cp = srv.chat_prompt(body)
        tokens = srv.llm.tokenize(cp.prompt.encode("utf-8"), add_bos=not cp.added_special, special=True)
        q, sinks = channel(body.n or 1)
        jobs = srv.completion_jobs(body, tokens, stop_list(body.stop) + cp.stop, sinks, prompt_text=cp.prompt,
                                   tool_grammar=cp.grammar)
        return await run(request, jobs, q, "/v1/chat/completions", chat=True, model=srv.model_id(body.model),
                         tools=bool(cp.tools))

    @app.post("/v1/otter/score", dependencies=v1)
    async def score(request: Request, body: ScoreRequest):
        t0 = time.monotonic()
        q, (sink,) = channel()
        job = srv.score_job(body, sink)
        submit([job], "/v1/otter/score")
        evs = await wait_done(request, [job], q)
        ev = evs[0] if evs else None
        finish("/v1/otter/score", t0, ev)
        if ev is None:
            return _error(499, "client closed the request")
        if isinstance(ev, Failed):
            return _error(ev.status, ev.message, type="server_error")
        return JSONResponse(srv.score_body(ev.score["tokens"], ev.score["signals"]))

    return app

