"""``otter-gguf convert`` and ``otter-gguf inspect``.

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
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert_command(adapter_dir: Path, base: Path, out: Path, outtype: str, base_outtype: str | None,
                    head_type: str | None, force: bool, no_progress: bool) -> None:
    """Convert an Otter adapter (ADAPTER_DIR) and its base model into one Otter GGUF."""
    from otter_gguf_converter.convert import convert

    if base_outtype is not None and base.is_file():
        raise UserError(
            f"--base-outtype applies to an HF model directory base only; {base} is a file and is copied "
            f"unchanged (re-quantize it with llama-quantize first if you want another type)"
        )
    # SIGTERM unwinds like Ctrl-C, so the temporary file is removed
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _sigterm) if main_thread else None
    try:
        with reported("convert", *_USER_ERRORS):
            path = convert(adapter_dir, base, out, outtype=outtype.lower(),
                           base_outtype=(base_outtype or "f16").lower(),
                           head_type=head_type.lower() if head_type else None, force=force,
                           progress=not no_progress)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    click.echo(f"wrote {path}", err=True)


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


@click.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def inspect_command(file: Path, as_json: bool) -> None:
    """Show the base model and the Otter head (if any) of a GGUF FILE."""
    from otter_gguf_converter.inspect import format_report, inspect_gguf

    with reported("inspect", *_USER_ERRORS):
        report = inspect_gguf(file)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
