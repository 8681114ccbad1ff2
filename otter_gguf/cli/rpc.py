"""``otter-gguf rpc-server``: llama.cpp's RPC server (``ggml-rpc-server``, built with the runtime)."""

from __future__ import annotations

import os
import sys

import click


@click.command("rpc-server", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def rpc_server_command(args) -> None:
    """Run llama.cpp's RPC server of this runtime (built from the same patched source), so that
    a model run with `--rpc HOST:PORT` offloads layers to this machine. ARGS are the server's own:
    -H/--host (default 127.0.0.1), -p/--port (default 50052), -t/--threads, -d/--device, -c/--cache;
    `otter-gguf rpc-server --help` lists them. It has no authentication: bind it to a trusted network only."""
    from otter_gguf.runtime.backends import rpc_server_binary

    try:
        exe = rpc_server_binary()
    except (FileNotFoundError, ImportError, OSError) as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(2) from None
    sys.stdout.flush()
    os.execv(str(exe), [str(exe), *args])
