"""How every command reports failures: user errors exit 2, internal errors exit 1."""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

import click


class UserError(click.ClickException):
    """A user error: printed as ``Error: ...``, exit code 2."""

    exit_code = 2


def internal_error(cmd: str, e: BaseException) -> None:
    """Print the traceback and a one-line summary, exit 1."""
    traceback.print_exc(file=sys.stderr)
    click.echo(f"otter-gguf {cmd}: internal error: {type(e).__name__}: {e}", err=True)
    sys.exit(1)


@contextmanager
def reported(cmd: str, *user_errors: type[BaseException]) -> Iterator[None]:
    """Run a command's body: ``user_errors`` become :class:`UserError` (exit 2),
    click's own exits pass through, anything else is an internal error (exit 1)."""
    try:
        yield
    except user_errors as e:
        raise UserError(str(e)) from None
    except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001
        internal_error(cmd, e)
