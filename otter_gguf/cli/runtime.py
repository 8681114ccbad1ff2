"""``otter-gguf build-runtime``: build and install the patched llama.cpp runtime."""

from __future__ import annotations

from pathlib import Path

import click

from otter_gguf.runtime import build as rb


@click.command("build-runtime")
@click.option("--check", is_flag=True,
              help="Only say whether the installed runtime carries the current patch series.")
@click.option("--force", is_flag=True, help="Rebuild and reinstall even if up to date.")
@click.option("--cmake-args", default=None, metavar="ARGS",
              help="Extra CMake arguments (default: $CMAKE_ARGS), e.g. -DGGML_METAL=ON.")
@click.option("--dev-source", type=click.Path(path_type=Path), default=None,
              help="Instead of building: lay out the pristine source with the series applied "
                   "as git commits in this directory (see CONTRIBUTING.md).")
def build_runtime_command(check: bool, force: bool, cmake_args: str | None,
                          dev_source: Path | None) -> None:
    """Build the patched llama.cpp runtime (llama-cpp-python) and install it here."""
    try:
        if dev_source is not None:
            path = rb.make_dev_source(dev_source)
            click.echo(f"{path}: pristine llama.cpp + {len(rb.patch_series())} patch commit(s); "
                       "tag 'pristine' marks the base")
            return
        if check:
            want = rb.SERIES_PREFIX + rb.series_id()
            got = rb.installed_series()
            if got == want:
                click.echo(f"runtime is current: {got}")
                return
            click.echo(f"runtime is NOT current: installed {got or 'no patched runtime'}, "
                       f"patches/ is {want}; run `otter-gguf build-runtime`")
            raise SystemExit(1)
        rb.build_runtime(cmake_args, force=force)
    except rb.RuntimeBuildInputError as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(2) from None
    except rb.RuntimeBuildError as e:
        raise click.ClickException(str(e)) from None
