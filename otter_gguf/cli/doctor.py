"""``otter-gguf doctor``: versions, the runtime's series and backends, the cache, problems and fixes."""

from __future__ import annotations

import click


@click.command("doctor")
def doctor_command() -> None:
    """Check this install: versions, the runtime's patch series against the
    package's, ggml backends and CPU features, the cache. Exit 1 when a
    problem is found (each with what to do)."""
    from otter_gguf.tools.doctor import diagnose, format_report

    report = diagnose()
    click.echo(format_report(report))
    if not report.ok:
        raise SystemExit(1)
