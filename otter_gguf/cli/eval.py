"""``otter-gguf eval``: signal error and main-logit KLD of a model's quantizations (docs/EVAL.md)."""

from __future__ import annotations

from pathlib import Path

import click

from otter_gguf.cli.errors import UserError, reported
from otter_gguf.cli.offload import offload_options, pop_offload
from otter_gguf.tools import eval as ev


@click.command("eval")
@click.argument("model", metavar="MODEL.gguf", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(path_type=Path),
              help="The Otter adapter directory (otter_config.json + otter_model.safetensors).")
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
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
@offload_options
def eval_command(model: Path, adapter_dir: Path, base_dir: Path, types: str, prompts: Path | None,
                 out_dir: Path, threads: int | None, kv_type: str, keep_gguf: bool,
                 no_progress: bool, **offload) -> None:
    """Signal error and main-logit KLD of MODEL.gguf's quantizations.

    MODEL.gguf is the unquantized (f32, or f16/bf16) GGUF of the base, plain
    or with the Otter head (then its own signal error is the first row):
    the reference of the main logits and the source of the quantized bases.
    See docs/EVAL.md.
    """
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
