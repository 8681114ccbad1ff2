"""``otter-gguf bench``: speed, RSS and bytes of Otter against base-only and a separate reward model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import click

from otter_gguf.cli.errors import UserError
from otter_gguf.cli.offload import offload_options, pop_offload
from otter_gguf.tools import bench


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


@click.command("bench")
@click.option("--quick", is_flag=True, help="tiny random model, few tokens, one repeat (smoke test)")
@click.option("--models", default=None, help="comma list of " + ", ".join(bench.MODELS)
              + " [default: 1b,demo; --quick: tiny]")
@click.option("--types", default=None, help="comma list of base/Otter types [default: q4_k_m,q8_0; --quick: q8_0]")
@click.option("--repeats", type=int, default=None, help="repeats per configuration [default: 3; --quick: 1]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the full report (every repeat) as JSON")
@click.option("--sections", default="main,ctx,d2,profile", show_default=True,
              help="main (the configurations table), ctx (tok/s against context length), d2 (against d2), "
                   "profile (graph node timing of (a), (b), (d_tok))")
@click.option("--configs", default=",".join(bench.CONFIGS), show_default=True, help="configurations of the main table")
@click.option("-t", "--threads", type=int, default=2, show_default=True)
@click.option("--n-prompt", type=int, default=None, help="prompt tokens [default: 128; --quick: 16]")
@click.option("--n-decode", type=int, default=None, help="decoded tokens [default: 32; --quick: 4]")
@click.option("--top-k", type=int, default=10, show_default=True, help="ARGS candidates per step")
@click.option("--ctx-lengths", default=None, help="context lengths [default: 256,512,1024,2048,4096; --quick: 32,64]")
@click.option("--ctx-decode", type=int, default=None, help="tokens decoded at each context length [default: 16]")
@click.option("--d2", "d2_values", default=None, help="d2 values of the sweep [default: d/16,d/8,d/4,d/2]")
@click.option("--sweep-type", default=None, help="type of the ctx and d2 sweeps [default: the first of --types]")
@click.option("--sweep-repeats", type=int, default=None, help="repeats of the sweeps [default: --repeats]")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=bench.DEFAULT_CACHE,
              show_default=True, help="where the generated models are kept (never in the repository)")
@offload_options
def bench_command(quick, models, types, repeats, json_out, sections, configs, threads, n_prompt, n_decode, top_k,
                  ctx_lengths, ctx_decode, d2_values, sweep_type, sweep_repeats, cache_dir, **offload):
    """Benchmark Otter against base-only and a separate reward model (speed, RSS, bytes)."""
    models_l = _csv(models) if models else (["tiny"] if quick else ["1b", "demo"])
    for m in models_l:
        if m not in bench.MODELS:
            raise click.BadParameter(f"unknown model {m!r}; expected one of {', '.join(bench.MODELS)}",
                                     param_hint="--models")
    configs_l = _csv(configs)
    for c in configs_l:
        if c not in bench.CONFIGS:
            raise click.BadParameter(f"unknown configuration {c!r}; expected {', '.join(bench.CONFIGS)}",
                                     param_hint="--configs")
    if "a" not in configs_l:
        configs_l.insert(0, "a")  # every extra time is measured against (a)
    secs = _csv(sections)
    for s in secs:
        if s not in ("main", "ctx", "d2", "profile"):
            raise click.BadParameter(f"unknown section {s!r}", param_hint="--sections")
    try:
        report = bench.run_bench(
            quick=quick, models=models_l, types=_csv(types) if types else (["q8_0"] if quick else ["q4_k_m", "q8_0"]),
            repeats=repeats or (1 if quick else 3), threads=threads, cache_dir=cache_dir, sections=secs,
            configs=configs_l, n_prompt=n_prompt or (16 if quick else 128), n_decode=n_decode or (4 if quick else 32),
            top_k=top_k, ctx_lengths=[int(x) for x in _csv(ctx_lengths)] if ctx_lengths else
            ([32, 64] if quick else [256, 512, 1024, 2048, 4096]), ctx_decode=ctx_decode or (4 if quick else 16),
            d2_values=[int(x) for x in _csv(d2_values)] if d2_values else None, sweep_type=sweep_type,
            sweep_repeats=sweep_repeats, offload=pop_offload(offload))
    except bench.BenchError as e:
        raise UserError(str(e)) from None
    text = bench.format_report(report)
    click.echo(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(bench.portable(json.dumps(report, indent=1, default=str)) + "\n")
        click.echo(f"JSON: {json_out}", err=True)
