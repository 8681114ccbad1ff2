"""The `otter-gguf` command line."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="otter-gguf")
def main() -> None:
    """Otter reward heads on llama.cpp: convert, inspect, run, score."""


def _register() -> None:
    from otter_gguf.runtime_build import build_runtime_command

    main.add_command(build_runtime_command)
    import otter_gguf_converter.cli as _converter_cli
    _converter_cli.register(main)
    from otter_gguf.cli_run import register as _register_run
    _register_run(main)
    from otter_gguf.eval import register as _register_eval
    _register_eval(main)
    from otter_gguf.bench import bench_command
    main.add_command(bench_command)


_register()

if __name__ == "__main__":
    main()
