"""``otter-gguf eval``: signal error and main-logit KLD of a model's quantizations; with ``--quality``, Otter
heads against reward models trained on the same data (docs/EVAL.md)."""

from __future__ import annotations

from pathlib import Path

import click

from otter_gguf.cli.errors import UserError, reported
from otter_gguf.cli.offload import offload_options, pop_offload
from otter_gguf.tools import eval as ev


@click.command("eval")
@click.argument("model", metavar="MODEL.gguf", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(path_type=Path),
              help="The Otter adapter directory (otter_config.json + otter_model.safetensors).")
@click.option("--base", "base_dir", default=None, type=click.Path(path_type=Path),
              help="The HF base model directory, or a base GGUF (the float32 PyTorch reference runs on "
                   "it; a GGUF's weights dequantized).")
@click.option("--types", default=",".join(ev.DEFAULT_TYPES), show_default=True,
              help="Comma-separated types: each quantizes the base (llama-quantize) and the Otter "
                   "tensors (otter-gguf convert --outtype) to it.")
@click.option("--prompts", "prompts", type=click.Path(path_type=Path), default=None,
              help="Prompt file, one text per line ('#' comments). Default: the packaged set.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("otter-eval"),
              show_default=True, help="Directory for eval.json, eval.md and eval.png.")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
              help="Threads for llama.cpp (default: half the CPUs, as llama-cpp-python).")
@click.option("--kv-type", type=click.Choice(sorted(ev.KV_TYPES)), default="f16", show_default=True,
              help="KV cache type of every runtime model (f32 isolates the weight quantization).")
@click.option("--keep-gguf", is_flag=True, help="Keep the per-type GGUFs in OUT/gguf/.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--quality", is_flag=True,
              help="Instead: train Otter heads and reward models on the same data for MODEL.gguf (a base GGUF, "
                   "any type) and compare them (quality.json, quality.md in --out).")
@click.option("--tasks", default="sentiment,preference,correctness", show_default=True, help="--quality: the tasks.")
@click.option("--d2", "d2_list", default="32,64,128", show_default=True, help="--quality: the Otter head widths.")
@click.option("--rm-layers", default="0,4", show_default=True,
              help="--quality: one reward model per entry, fine-tuning its top N layers (0: all).")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="--quality: optimizer steps of every model (batch 8).")
@click.option("--train-records", type=click.IntRange(min=2), default=800, show_default=True)
@click.option("--heldout-records", type=click.IntRange(min=2), default=120, show_default=True)
@click.option("--weight", type=float, default=8.0, show_default=True, help="--quality: guidance weight (±).")
@click.option("--top-k", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@offload_options
def eval_command(model: Path, adapter_dir: Path | None, base_dir: Path | None, types: str, prompts: Path | None,
                 out_dir: Path, threads: int | None, kv_type: str, keep_gguf: bool,
                 no_progress: bool, quality: bool, tasks: str, d2_list: str, rm_layers: str, steps: int,
                 train_records: int, heldout_records: int, weight: float, top_k: int, seed: int,
                 **offload) -> None:
    """Signal error and main-logit KLD of MODEL.gguf's quantizations.

    MODEL.gguf is the unquantized (f32, or f16/bf16) GGUF of the base, plain
    or with the Otter head (then its own signal error is the first row):
    the reference of the main logits and the source of the quantized bases.
    With --quality: Otter heads against reward models trained on the same
    data, on the base MODEL.gguf. See docs/EVAL.md.
    """
    if quality:
        return _quality(model, out_dir, threads, tasks, d2_list, rm_layers, steps, train_records, heldout_records,
                        weight, top_k, seed)
    for name, v in (("--adapter", adapter_dir), ("--base", base_dir)):
        if v is None:
            raise click.UsageError(f"Missing option '{name}' (or pass --quality)")
    from otter_gguf.format.config import AdapterError
    from otter_gguf.reference.model import ReferenceError as RefError
    from otter_gguf_converter.errors import ConvertError

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    try:
        type_list = ev.parse_types(types)
    except ev.EvalError as e:
        raise click.BadParameter(str(e), param_hint="--types") from None
    offload_kw = pop_offload(offload)
    with reported("eval", ev.EvalError, ConvertError, AdapterError, RefError):
        report = ev.evaluate(model, adapter_dir, base_dir, types=type_list, prompts=prompts,
                             threads=threads, kv_type=kv_type, offload=offload_kw,
                             keep_dir=(out_dir / "gguf") if keep_gguf else None,
                             progress=not no_progress)
    try:
        paths = ev.write_outputs(report, out_dir)
    except OSError as e:
        raise UserError(f"cannot write to --out {out_dir}: {e.strerror or e}") from None
    click.echo(ev.format_table(report))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())} ({report['seconds']} s)", err=True)


def _ints(text: str, option: str, low: int) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < low:
        raise click.BadParameter(f"expected comma-separated integers >= {low}, found {text!r}", param_hint=option)
    return vals


def _quality(model: Path, out_dir: Path, threads: int | None, tasks: str, d2_list: str, rm_layers: str, steps: int,
             train_records: int, heldout_records: int, weight: float, top_k: int, seed: int) -> None:
    from otter_gguf.io import gguf_read
    from otter_gguf.io.errors import InputError
    from otter_gguf.reference.reward_model_gguf import RM_ARCHITECTURES
    from otter_gguf.tools.quality import QualitySettings, run_quality
    from otter_gguf.tools.quality.tasks import TASKS

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if not names or bad:
        what = ", ".join(bad) if bad else repr(tasks)
        raise click.BadParameter(f"unknown task(s) {what}; expected some of {', '.join(TASKS)}", param_hint="--tasks")
    d2, layers = _ints(d2_list, "--d2", 1), _ints(rm_layers, "--rm-layers", 0)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    with reported("eval", InputError):
        arch = gguf_read.field_value(gguf_read.open_gguf(model, "base"), "general.architecture")
        if arch not in RM_ARCHITECTURES:
            raise InputError(f"{model}: a {arch} base; --quality needs one llama.cpp can also run as a reward model "
                             f"({', '.join(RM_ARCHITECTURES)})")
    s = QualitySettings(tasks=names, d2=d2, rm_layers=layers,
                        steps=steps, n_train=train_records, n_heldout=heldout_records, seed=seed,
                        threads=threads or 2, weight=weight, top_k=top_k)
    with reported("eval", InputError):
        run_quality(model, out_dir, s, log=lambda m: click.echo(m, err=True))
    click.echo((out_dir / "quality.md").read_text())
    click.echo(f"wrote {out_dir / 'quality.json'}, {out_dir / 'quality.md'}", err=True)
