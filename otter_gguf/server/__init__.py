"""``otter-gguf serve``: an OpenAI-compatible HTTP server over the Otter runtime (docs/SERVE.md).

* :mod:`.engine`: continuous batching over one llama_context (the scheduler
  thread, sequence pool, per-request samplers, signals and ``otter`` blocks);
* :mod:`.text`: a completion's text, stop strings and streamed deltas;
* :mod:`.protocol`: request bodies (llama-cpp-python's server models plus ``otter``) and checks;
* :mod:`.app`: the FastAPI app (routes, SSE, errors, API key, limits);
* :mod:`.metrics`: ``/metrics`` in Prometheus text format;
* :mod:`.model`: :class:`ServeConfig` and loading the served model.

Importing this package imports nothing heavy; :func:`serve` and :func:`create_app`
load fastapi and llama_cpp.
"""

from __future__ import annotations

from otter_gguf.server.model import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(cfg: ServeConfig, llm=None):
    """The FastAPI app of ``cfg`` (see :func:`otter_gguf.server.app.create_app`)."""
    from otter_gguf.server.app import create_app as _create

    return _create(cfg, llm)


def serve(cfg: ServeConfig) -> None:
    """Load the model and serve it with uvicorn until interrupted."""
    import uvicorn

    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info" if cfg.verbose else "warning")
