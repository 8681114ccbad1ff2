"""The `otter-gguf` command line: click commands only, one module per command family.

Each command parses its options, calls the library layer below (format,
converter, runtime, tools) and maps its errors to exit codes
(:mod:`otter_gguf.cli.errors`). Nothing outside this package imports click.
"""

from __future__ import annotations

import click

from otter_gguf.cli.bench import bench_command
from otter_gguf.cli.convert import convert_command, inspect_command, merge_command, split_command
from otter_gguf.cli.doctor import doctor_command
from otter_gguf.cli.eval import eval_command
from otter_gguf.cli.rpc import rpc_server_command
from otter_gguf.cli.run import run_command, score_command
from otter_gguf.cli.runtime import build_runtime_command
from otter_gguf.cli.serve import serve_command
from otter_gguf.cli.train import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="otter-gguf")
@click.option("-v", "--verbose", is_flag=True,
              help="Show llama.cpp's log (model loading, context setup) on stderr; without it, errors only.")
def main(verbose: bool) -> None:
    """Otter reward heads on llama.cpp: train, convert, inspect, run, score."""
    from otter_gguf.cli import logs

    logs.configure(verbose)


for _command in (build_runtime_command, convert_command, inspect_command, run_command, score_command,
                 eval_command, bench_command, train_command, split_command, merge_command, serve_command,
                 rpc_server_command):
    main.add_command(_command)
main.add_command(doctor_command)

__all__ = ["main"]
