"""`otter-gguf serve`: the OpenAI-compatible server (docs/SERVE.md).

Flags are named as llama.cpp's llama-server names them (--host, --port,
--api-key, -np/--parallel, -c/--ctx-size, -b/--batch-size, -t/--threads,
-fa/--flash-attn, -a/--alias; -ngl, -sm, -mg, -ts, --rpc: cli/offload.py). Bad use exits
with status 2.
"""

from __future__ import annotations

import os

import click

from otter_gguf.cli.errors import reported
from otter_gguf.cli.offload import offload_options, pop_offload


@click.command("serve")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--head", "heads", multiple=True, metavar="[NAME=]PATH",
              help="A sidecar Otter head GGUF to load next to MODEL (repeatable; with several heads the "
                   "signals are named NAME/signal).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port.")
@click.option("--api-key", default=None, envvar="OTTER_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (env OTTER_API_KEY).")
@click.option("-a", "--alias", default=None, help="Model id in responses and /v1/models (default: file name).")
@click.option("-np", "--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sequences decoded together (the pool; guidance with top_k=k takes k+1).")
@click.option("-c", "--ctx-size", type=click.IntRange(min=8), default=4096, show_default=True,
              help="Context per sequence (prompt + completion) in tokens; the KV cache holds parallel x this.")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per batched decode step (prompts are chunked to fit).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="Threads (default: llama-cpp-python's).")
@click.option("-fa", "--flash-attn", type=click.Choice(["on", "off", "auto"]), default="off", show_default=True,
              help="Flash attention.")
@click.option("-s", "--seed", type=int, default=None, help="Default seed of requests without one (default: random).")
@click.option("--queue-size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a sequence; beyond it: 503 with Retry-After.")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Largest max_tokens a request may ask for (400 above).")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body (413 above).")
@click.option("--chat-template-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A Jinja chat template to use instead of the GGUF's tokenizer.chat_template.")
@click.option("--draft-ngram", type=click.IntRange(1, 32), default=None, metavar="N",
              help="Speculative decoding by prompt lookup on each request's own context, N draft tokens per step.")
@click.option("-md", "--model-draft", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Speculative decoding with this small GGUF (the base's vocabulary) as the drafter.")
@click.option("--draft-max", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Draft tokens per step of --model-draft.")
@click.option("--no-cache-prompt", "no_cache_prompt", is_flag=True,
              help="No prompt cache: a finished request's KV cells are cleared and every prompt is decoded whole "
                   "(the same request then gives bit-identical results whatever ran before).")
@offload_options
@click.option("-v", "--verbose", is_flag=True, help="llama.cpp's log and uvicorn's access log.")
def serve_command(model, heads, host, port, api_key, alias, parallel, ctx_size, batch_size, threads, flash_attn,
                  seed, queue_size, max_tokens_limit, max_request_bytes, chat_template_file, draft_ngram, model_draft,
                  draft_max, no_cache_prompt, verbose, **offload):
    """Serve MODEL over HTTP: /v1/completions, /v1/chat/completions (streaming by SSE),
    /v1/otter/score, /v1/models, /health, /metrics. Every choice and chunk carries the
    `otter` field (tokens, rewards, signals, offsets); concurrent requests are batched."""
    from otter_gguf.server import ServeConfig, serve

    for h in heads:
        path = h.partition("=")[2] or h
        if not os.path.isfile(path):
            raise click.BadParameter(f"{path!r}: no such file", param_hint="--head")
    cfg = ServeConfig(model=model, heads=list(heads), host=host, port=port, api_key=api_key or None,
                      model_alias=alias, parallel=parallel, ctx_size=ctx_size, n_batch=batch_size, threads=threads,
                      flash_attn={"on": True, "off": False}.get(flash_attn, "auto"), queue_size=queue_size,
                      max_tokens_limit=max_tokens_limit, max_request_bytes=max_request_bytes, seed=seed,
                      cache_prompt=not no_cache_prompt, verbose=verbose, draft_ngram=draft_ngram,
                      model_draft=model_draft, draft_max=draft_max, offload=pop_offload(offload),
                      chat_template=open(chat_template_file, encoding="utf-8").read() if chat_template_file else None)
    if draft_ngram is not None and model_draft is not None:
        raise click.UsageError("give one of --draft-ngram and --model-draft")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"otter-gguf serve: warning: listening on {host} without --api-key", err=True)
    with reported("serve", ValueError):
        serve(cfg)
