"""``otter-gguf convert``, ``split``, ``merge`` and ``inspect``.

Exit codes: 0 success, 2 user error (bad input, bad option, mismatched base;
the message says what was wrong and what was expected), 1 internal error.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click

from otter_gguf.cli.errors import UserError, reported
from otter_gguf.format.config import AdapterError
from otter_gguf_converter.errors import ConvertError
from otter_gguf_converter.hf_base import BASE_OUTTYPES
from otter_gguf_converter.qtypes import HEAD_TYPES, OUTTYPES


_USER_ERRORS = (ConvertError, AdapterError)


@click.command("convert")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "base", required=True, type=click.Path(path_type=Path),
              help="Base model: a GGUF file (any quantization) or an HF model directory.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output Otter GGUF file.")
@click.option("--outtype", type=click.Choice(OUTTYPES, case_sensitive=False), default="f32", show_default=True,
              help="Type of the Otter matrices (1-D tensors stay f32); llama.cpp mixes allowed, see docs/FORMAT.md.")
@click.option("--base-outtype", type=click.Choice(BASE_OUTTYPES, case_sensitive=False), default=None,
              help="HF base only: type of the converted base (default f16).")
@click.option("--head-type", type=click.Choice(HEAD_TYPES, case_sensitive=False), default=None,
              help="Type of otter_head.weight (default: --outtype, but at least q8_0).")
@click.option("--sidecar", is_flag=True,
              help="Write only the head: an Otter adapter GGUF for BASE (the base file stays as it is).")
@click.option("--name", default=None, help="--sidecar: the head's name (default: ADAPTER_DIR's name).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert_command(adapter_dir: Path, base: Path, out: Path, outtype: str, base_outtype: str | None,
                    head_type: str | None, sidecar: bool, name: str | None, force: bool, no_progress: bool) -> None:
    """Convert an Otter adapter (ADAPTER_DIR) and its base model into one Otter GGUF, or with
    --sidecar into an Otter adapter GGUF beside the base."""
    from otter_gguf_converter.convert import convert

    if name is not None and not sidecar:
        raise UserError("--name applies to --sidecar only (a one-file Otter GGUF keeps the base's general.name)")
    if base_outtype is not None and base.is_file():
        raise UserError(
            f"--base-outtype applies to an HF model directory base only; {base} is a file and is copied "
            f"unchanged (re-quantize it with llama-quantize first if you want another type)"
        )
    path = _writing("convert", lambda: convert(
        adapter_dir, base, out, outtype=outtype.lower(), base_outtype=(base_outtype or "f16").lower(),
        head_type=head_type.lower() if head_type else None, force=force, progress=not no_progress,
        sidecar=sidecar, name=name))
    click.echo(f"wrote {path}", err=True)


def _writing(cmd: str, body):
    """Run a command that writes files: SIGTERM unwinds like Ctrl-C (temporary files are removed),
    user errors exit 2."""
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _sigterm) if main_thread else None
    try:
        with reported(cmd, *_USER_ERRORS):
            return body()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


@click.command("split")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--base-out", required=True, type=click.Path(path_type=Path), help="Output base GGUF.")
@click.option("--head-out", required=True, type=click.Path(path_type=Path), help="Output Otter adapter GGUF.")
@click.option("--name", default=None, help="The head's name (default: the stem of --head-out).")
@click.option("--force", is_flag=True, help="Overwrite the outputs if they exist.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def split_command(model: Path, base_out: Path, head_out: Path, name: str | None, force: bool,
                  no_progress: bool) -> None:
    """Split a one-file Otter GGUF (MODEL) into its base GGUF and an Otter adapter GGUF."""
    from otter_gguf_converter.sidecar import split

    b, h = _writing("split", lambda: split(model, base_out, head_out, name=name, force=force,
                                           progress=not no_progress))
    click.echo(f"wrote {b} and {h}", err=True)


@click.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("heads", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output one-file Otter GGUF.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def merge_command(base: Path, heads: tuple[Path, ...], out: Path, force: bool, no_progress: bool) -> None:
    """Merge a base GGUF (BASE) and an Otter adapter GGUF (HEAD) into one Otter GGUF."""
    from otter_gguf_converter.sidecar import merge

    path = _writing("merge", lambda: merge(base, heads, out, force=force, progress=not no_progress))
    click.echo(f"wrote {path}", err=True)


@click.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def inspect_command(file: Path, as_json: bool) -> None:
    """Show the base model and the Otter head (if any) of a GGUF FILE, or an Otter adapter GGUF."""
    from otter_gguf_converter.inspect import format_report, inspect_gguf

    with reported("inspect", *_USER_ERRORS):
        report = inspect_gguf(file)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
