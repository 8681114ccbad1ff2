"""``otter-gguf build-runtime``: build and install the patched llama.cpp runtime."""

from __future__ import annotations

from pathlib import Path

import click

from otter_gguf.runtime import build as rb


@click.command("build-runtime")
@click.option("--check", is_flag=True,
              help="Only say whether the installed runtime carries this package's patch series (exit 1 if not).")
@click.option("--force", is_flag=True, help="Rebuild the wheel and reinstall it even if up to date.")
@click.option("--cmake-args", default=None, metavar="ARGS",
              help="Extra CMake arguments (default: $CMAKE_ARGS), e.g. -DGGML_METAL=ON.")
@click.option("--portable", is_flag=True,
              help="Build for a baseline ISA (x86-64-v3: AVX2/FMA/F16C/BMI2, no AVX-512) instead of this "
                   "machine's, so the wheel runs on any such machine.")
@click.option("--backend", "backends", multiple=True, metavar="NAME",
              help=f"A ggml backend to build, repeatable or comma-separated: {', '.join(rb.BACKENDS)} "
                   f"(default: {','.join(rb.DEFAULT_BACKENDS)}; the CPU backend is always built). "
                   "Part of the cache key.")
@click.option("--wheel-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the built wheel to this directory (to install it on other machines).")
@click.option("--no-install", is_flag=True, help="Build (or take from the cache) the wheel but do not install it.")
@click.option("--dev-source", type=click.Path(path_type=Path), default=None,
              help="Instead of building: lay out the pristine source with the series applied "
                   "as git commits in this directory (see CONTRIBUTING.md).")
def build_runtime_command(check: bool, force: bool, cmake_args: str | None, portable: bool,
                          backends: tuple[str, ...], wheel_out: Path | None, no_install: bool,
                          dev_source: Path | None) -> None:
    """Build the patched llama.cpp runtime (llama-cpp-python) and install it here.

    The wheel is cached (see `otter-gguf doctor` for where); progress goes to
    stderr and the full build log to the cache. Exit 1: the build failed;
    exit 2: bad input or a missing tool (compiler, cmake, git, patch series).
    """
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
                click.echo(f"runtime is current: {got} (patch series from {rb.patches_dir()})")
                return
            click.echo(f"runtime is NOT current: installed {got or 'no patched runtime'}, "
                       f"this package's patch series ({rb.patches_dir()}) is {want}; "
                       "run `otter-gguf build-runtime`")
            raise SystemExit(1)
        chosen = [name.strip() for value in backends for name in value.split(",") if name.strip()]
        rb.build_runtime(cmake_args, force=force, portable=portable, wheel_out=wheel_out,
                         install=not no_install, backends=chosen or None)
    except rb.RuntimeBuildInputError as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(2) from None
    except rb.RuntimeBuildError as e:
        raise click.ClickException(str(e)) from None
