"""`otter-gguf run` and `otter-gguf score`: generate with rewards, score text.

Context flags are named as llama.cpp's tools name them (--ctx-size,
--threads, --batch-size, --flash-attn, --cache-type-k, --cache-type-v,
--seed; the offload flags -ngl, -sm, -mg, -ts, --rpc: cli/offload.py). Bad use exits with status 2 and a one-line reason. llama_cpp is
imported only when a command runs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, List, Optional, Sequence

import click

from otter_gguf.cli.offload import offload_options, pop_offload
from otter_gguf.format.constants import HeadKind

# KV cache types llama.cpp accepts for --cache-type-k/-v (ggml_type ids)
CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3,
               "iq4_nl": 20, "q5_0": 6, "q5_1": 7}


DEFAULT_CTX = 4096


def _default_ctx(model: str) -> int:
    """DEFAULT_CTX, or the model's training context (GGUF ``<arch>.context_length``) when smaller."""
    from otter_gguf.io.gguf_read import field_value, open_gguf
    from otter_gguf_converter.errors import ConvertError

    try:
        reader = open_gguf(model, "model")
        train = field_value(reader, f"{field_value(reader, 'general.architecture')}.context_length")
    except (ConvertError, ValueError, OSError):
        return DEFAULT_CTX  # the loader names what is wrong with the file
    return min(DEFAULT_CTX, int(train)) if train else DEFAULT_CTX


def _context_options(f):
    opts = [
        click.option("-c", "--ctx-size", type=click.IntRange(min=0), default=None,
                     help=f"Context size in tokens (0 = the model's training context). Default: {DEFAULT_CTX}, "
                          "or the model's training context when smaller."),
        click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
                     help="Threads for generation and batch processing (default: llama-cpp-python's)."),
        click.option("-b", "--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Logical maximum batch size."),
        click.option("-fa", "--flash-attn", type=click.Choice(["on", "off", "auto"]), default="off",
                     show_default=True, help="Flash attention."),
        click.option("-ctk", "--cache-type-k", type=click.Choice(sorted(CACHE_TYPES)), default="f16",
                     show_default=True, help="KV cache type for K."),
        click.option("-ctv", "--cache-type-v", type=click.Choice(sorted(CACHE_TYPES)), default="f16",
                     show_default=True, help="KV cache type for V (quantized V needs --flash-attn)."),
        click.option("-s", "--seed", type=int, default=None,
                     help="RNG seed (sampling, guided sampling). Default: random."),
    ]
    for o in reversed(opts):
        f = o(f)
    return offload_options(f)


_head_option = click.option(
    "--head", "heads", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="PATH",
    help="An Otter adapter GGUF (a head) for MODEL, run beside it; repeat for several heads "
         "(signals are then named HEAD/SIGNAL).")


def _load(model: str, *, ctx_size, threads, batch_size, flash_attn, cache_type_k, cache_type_v, seed,
          guidance=None, otter: bool = True, heads: Sequence[str] = (), offload: Optional[dict] = None):
    from otter_gguf.cli import logs
    from otter_gguf.runtime.llama import OtterLlama

    logs.route_llama_logs()
    if ctx_size is None:
        ctx_size = _default_ctx(model)
    kw: dict[str, Any] = dict(n_ctx=ctx_size, n_batch=batch_size, flash_attn=flash_attn,
                              type_k=CACHE_TYPES[cache_type_k], type_v=CACHE_TYPES[cache_type_v],
                              verbose=logs.verbose(), otter=otter, **(offload or {}))
    if heads:
        kw["otter_heads"] = list(heads)
    if threads is not None:
        kw.update(n_threads=threads, n_threads_batch=threads)
    if seed is not None:
        kw["seed"] = seed
    if guidance is not None:
        kw["guidance"] = guidance
    try:
        return OtterLlama(model, **kw)
    except ValueError as e:
        hint = " (--guidance-signal NAME or NAME=COEF ...)" if "signal" in str(e) and guidance is not None else ""
        raise click.UsageError(f"cannot use {model}: {e}{hint}") from None


def _parse_signal_specs(specs: Sequence[str]):
    """--guidance-signal NAME or NAME=COEF (repeatable) -> None | str | dict."""
    if not specs:
        return None
    if len(specs) == 1 and "=" not in specs[0]:
        return specs[0]
    out: dict[str, float] = {}
    for s in specs:
        name, eq, coef = s.partition("=")
        if not name:
            raise click.BadParameter(f"{s!r}: expected NAME or NAME=COEF", param_hint="--guidance-signal")
        try:
            c = float(coef) if eq else 1.0
        except ValueError:
            raise click.BadParameter(f"{s!r}: COEF must be a number", param_hint="--guidance-signal") from None
        out[name] = out.get(name, 0.0) + c
    return out


# ---------------------------------------------------------------------------
# display
# ---------------------------------------------------------------------------
def _fmt(v: Optional[float]) -> str:
    return "       -" if v is None else f"{v:8.4f}"


def _reward_of(block: dict, i: int, coef: Optional[dict]) -> Optional[float]:
    """The one number shown per token: token reward (token_reward heads), the
    guidance signal combination, else the first signal."""
    if block.get("head_kind") == HeadKind.TOKEN_REWARD:
        return block["token_rewards"][i]
    row = block["signals"][i]
    if row is None:
        return None
    names = block["signal_names"]
    if coef:
        if any(row[names.index(n)] is None for n in coef):
            return None
        return sum(c * row[names.index(n)] for n, c in coef.items())
    return row[0]


def _colour(text: str, v: Optional[float]) -> str:
    """Background colour from red (low) through yellow to green (high); the
    scale is tanh(v), i.e. fixed, so colours are comparable across runs."""
    if v is None:
        return text
    x = (math.tanh(v) + 1.0) / 2.0
    r = int(round(255 * min(1.0, 2.0 * (1.0 - x))))
    g = int(round(255 * min(1.0, 2.0 * x)))
    return f"\x1b[48;2;{r};{g};60m\x1b[30m{text}\x1b[0m"


def _summary_lines(values: dict, n_tokens: int, elapsed: float) -> List[str]:
    lines = []
    for name, vals in values.items():
        v = [x for x in vals if x is not None]
        if v:
            lines.append(f"{name}: mean {sum(v) / len(v):.4f}  min {min(v):.4f}  last {v[-1]:.4f}")
    rate = n_tokens / elapsed if elapsed > 0 else float("inf")
    lines.append(f"tokens: {n_tokens}  time: {elapsed:.2f} s  speed: {rate:.1f} tokens/s")
    return lines


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------
@click.command("run")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "--n-predict", type=click.IntRange(min=1), default=128, show_default=True,
              help="Number of tokens to generate.")
@click.option("--temp", type=float, default=0.8, show_default=True,
              help="Temperature (<= 0: greedy).")
@click.option("--guidance-weight", type=float, default=None,
              help="Reward-guided decoding: w in logit + w * reward.")
@click.option("--guidance-top-k", type=int, default=None,
              help="Reward-guided decoding: candidates re-ranked per step (default 10).")
@click.option("--guidance-mode", type=click.Choice(["args", "dexperts"]), default=None,
              help="args (default) or dexperts (token_reward heads only).")
@click.option("--guidance-signal", multiple=True, metavar="NAME[=COEF]",
              help="Signal used as reward for multi-signal heads; repeat NAME=COEF for a weighted sum.")
@click.option("--display", type=click.Choice(["auto", "color", "columns"]), default="auto",
              show_default=True, help="Token rewards as a colour scale or as aligned columns.")
@click.option("--json", "as_json", is_flag=True, help="Print the completion object as JSON.")
@_head_option
@_context_options
def run_command(model, prompt, n_predict, temp, guidance_weight, guidance_top_k, guidance_mode,
                guidance_signal, display, as_json, heads, ctx_size, threads, batch_size, flash_attn,
                cache_type_k, cache_type_v, seed, **offload):
    """Generate from PROMPT with MODEL, showing each token's Otter reward."""
    from otter_gguf.runtime.guidance import Guidance

    guided = any(x is not None for x in (guidance_weight, guidance_top_k, guidance_mode)) or guidance_signal
    g = None
    if guided:
        try:
            g = Guidance(weight=1.0 if guidance_weight is None else guidance_weight,
                         top_k=10 if guidance_top_k is None else guidance_top_k,
                         mode=guidance_mode or "args",
                         signal=_parse_signal_specs(guidance_signal))
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    llm = _load(model, ctx_size=ctx_size, threads=threads, batch_size=batch_size, flash_attn=flash_attn,
                cache_type_k=cache_type_k, cache_type_v=cache_type_v, seed=seed, guidance=g, heads=heads,
                offload=pop_offload(offload))
    kw: dict[str, Any] = dict(max_tokens=n_predict, temperature=temp)
    if seed is not None:
        kw["seed"] = seed
    if g is not None:
        kw["guidance"] = g
    n_prompt = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    if n_prompt >= llm.n_ctx():
        raise click.UsageError(f"the prompt has {n_prompt} tokens; --ctx-size {llm.n_ctx()} leaves no room")
    if as_json:
        try:
            out = llm.create_completion(prompt, **kw)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return

    colour = display == "color" or (display == "auto" and sys.stdout.isatty())
    coef = None
    if isinstance(g, Guidance) and g.signal is not None:
        coef = {g.signal: 1.0} if isinstance(g.signal, str) else dict(g.signal)
    names: List[str] = []
    if llm.has_otter:
        names = [HeadKind.TOKEN_REWARD.value] if llm.head_kind == HeadKind.TOKEN_REWARD else list(llm.signal_names)
        if coef and llm.head_kind == HeadKind.REWARD:
            names = names + ["guidance"]
    values: dict = {n: [] for n in names}
    t0 = time.perf_counter()
    n_gen = 0
    try:
        stream = llm.create_completion(prompt, stream=True, **kw)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if not colour:
        click.echo(prompt)
        if names:
            click.echo(f"{'pos':>5} " + " ".join(f"{n[:8]:>8}" for n in names) + "  token")
    else:
        click.echo(prompt, nl=False)
    pos = 0
    for chunk in stream:
        ch = chunk["choices"][0]
        block = ch.get("otter")
        if block is None:  # no Otter head: plain text
            n_gen += 1 if ch.get("text") else 0
            click.echo(ch.get("text", ""), nl=False)
            continue
        for i, text in enumerate(block["token_texts"]):
            row = []
            if block.get("head_kind") == HeadKind.TOKEN_REWARD:
                row = [block["token_rewards"][i]]
            else:
                sig = block["signals"][i]
                row = list(sig) if sig is not None else [None] * len(block["signal_names"])
                if coef:
                    row.append(_reward_of(block, i, coef))
            for n, v in zip(names, row):
                values[n].append(v)
            n_gen += 1
            if colour:
                click.echo(_colour(text, _reward_of(block, i, coef)), nl=False, color=True)
            else:
                click.echo(f"{pos:>5} " + " ".join(_fmt(v) for v in row) + "  " + json.dumps(text))
            pos += 1
        if not block["tokens"] and ch.get("text") and not colour:
            click.echo(f"{'':>5} " + " ".join(" " * 8 for _ in names) + "  " + json.dumps(ch["text"]))
        elif not block["tokens"] and ch.get("text"):
            click.echo(ch["text"], nl=False)
    elapsed = time.perf_counter() - t0
    click.echo("")
    if not llm.has_otter:
        click.echo("(no Otter head: plain model, no rewards)")
    for line in _summary_lines(values, n_gen, elapsed):
        click.echo(line)


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------
def _parse_tokens(s: str) -> List[int]:
    parts = [p.strip() for p in s.replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise click.BadParameter("expected comma-separated token ids, e.g. 1,2,3", param_hint="--tokens")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{s!r}: token ids must be integers, e.g. 1,2,3", param_hint="--tokens") from None


@click.command("score")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--text", default=None, help="Text to score (tokenized like a prompt, with BOS).")
@click.option("--tokens", "tokens_s", default=None, metavar="ID,ID,...", help="Token ids to score.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"tokens": [...], "signals": [[n_out] per token], "signal_names": [...]}.')
@_head_option
@_context_options
def score_command(model, text, tokens_s, as_json, heads, ctx_size, threads, batch_size, flash_attn,
                  cache_type_k, cache_type_v, seed, **offload):
    """Per-token Otter signals of --text or --tokens (no sampling)."""
    if (text is None) == (tokens_s is None):
        raise click.UsageError("give exactly one of --text or --tokens")
    toks = _parse_tokens(tokens_s) if tokens_s is not None else None
    llm = _load(model, ctx_size=ctx_size, threads=threads, batch_size=batch_size, flash_attn=flash_attn,
                cache_type_k=cache_type_k, cache_type_v=cache_type_v, seed=seed, heads=heads,
                offload=pop_offload(offload))
    if not llm.has_otter:
        raise click.UsageError(f"{model} has no Otter head (a plain GGUF): nothing to score")
    if toks is not None:
        bad = [t for t in toks if not 0 <= t < llm.n_vocab()]
        if bad:
            raise click.BadParameter(f"token id {bad[0]} is outside the vocabulary (valid ids: 0..{llm.n_vocab() - 1})",
                                     param_hint="--tokens")
    try:
        res = llm.score(text, tokens=toks) if toks is None else llm.score(tokens=toks)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    if res.head_kind == HeadKind.TOKEN_REWARD:
        tr = res.token_rewards
        click.echo(f"{'pos':>5} {'id':>7} {'token_reward':>12}  {'best_next':>9} {'max':>8}  token")
        for j, (t, txt) in enumerate(zip(res.tokens, res.token_texts)):
            v = None if math.isnan(float(tr[j])) else float(tr[j])
            best = int(res.signals[j].argmax())
            click.echo(f"{j:>5} {t:>7} {_fmt(v):>12}  {best:>9} {float(res.signals[j, best]):8.4f}  "
                       f"{json.dumps(txt)}")
        return
    click.echo(f"{'pos':>5} {'id':>7} " + " ".join(f"{n[:12]:>12}" for n in res.signal_names) + "  token")
    for j, (t, txt) in enumerate(zip(res.tokens, res.token_texts)):
        click.echo(f"{j:>5} {t:>7} " + " ".join(f"{float(v):12.4f}" for v in res.values[j])
                   + f"  {json.dumps(txt)}")
