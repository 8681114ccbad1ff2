"""How every command reports failures: user errors exit 2, internal errors exit 1."""

from __future__ import annotations

import sys
import traceback

import click


class UserError(click.ClickException):
    """A user error: printed as ``Error: ...``, exit code 2."""

    exit_code = 2


def internal_error(cmd: str, e: BaseException) -> None:
    """Print the traceback and a one-line summary, exit 1."""
    traceback.print_exc(file=sys.stderr)
    click.echo(f"otter-gguf {cmd}: internal error: {type(e).__name__}: {e}", err=True)
    sys.exit(1)
