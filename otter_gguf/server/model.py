"""Loading the served model: one OtterLlama whose context holds every sequence of the pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

__all__ = ["ServeConfig", "load_model", "load_drafter"]

@dataclass
class ServeConfig:
    """The server's settings (``otter-gguf serve`` options)."""

    model: str
    heads: List[str] = field(default_factory=list)  # --head PATH or NAME=PATH
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    model_alias: Optional[str] = None
    parallel: int = 4
    ctx_size: int = 4096  # tokens per sequence (prompt + completion)
    n_batch: int = 512
    threads: Optional[int] = None
    threads_batch: Optional[int] = None
    flash_attn: Any = False
    seed: Optional[int] = None  # the seed of requests without one (None: random per request)
    queue_size: int = 64
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1 << 20
    retry_after_s: int = 1
    chat_template: Optional[str] = None  # --chat-template-file: a Jinja chat template instead of the GGUF's
    cache_prompt: bool = True  # keep finished sequences' cells and reuse prompt prefixes (--no-cache-prompt: off)
    draft_ngram: Optional[int] = None  # --draft-ngram N: prompt lookup drafting N tokens per step
    model_draft: Optional[str] = None  # --model-draft FILE: a small GGUF of the same vocabulary drafts
    draft_max: int = 4  # --draft-max: the draft model's tokens per step
    # -ngl/-sm/-mg/-ts/--rpc as OtterLlama arguments (n_gpu_layers, split_mode, main_gpu, tensor_split,
    # rpc_servers: cli/offload.py); the draft model stays on the CPU
    offload: dict = field(default_factory=dict)
    verbose: bool = False

    @property
    def name(self) -> str:
        from pathlib import Path

        return self.model_alias or Path(self.model).name


def load_model(cfg: ServeConfig, heads: Sequence[str] = ()) -> Any:
    """The :class:`~otter_gguf.runtime.llama.OtterLlama` of ``cfg``: ``n_seq_max = parallel``
    (unified KV cache), ``n_ctx = parallel * ctx_size``. ``heads`` (``--head PATH`` or
    ``--head NAME=PATH``) are passed to OtterLlama as ``otter_heads`` (sidecar Otter heads:
    a list of paths, or a ``{name: path}`` dict)."""
    from otter_gguf.runtime.llama import OtterLlama

    if cfg.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {cfg.parallel}")
    if cfg.ctx_size < 8:
        raise ValueError(f"--ctx-size must be >= 8, got {cfg.ctx_size}")
    kwargs: dict = {}
    heads = list(heads or cfg.heads)
    if heads:
        named = [h.partition("=") for h in heads]
        if any(eq for _, eq, _ in named):
            if not all(eq and name for name, eq, _ in named):
                raise ValueError("--head: name every head (NAME=PATH) or none of them")
            heads = {name: path for name, _, path in named}
        kwargs["otter_heads"] = heads
    n_batch = max(cfg.n_batch, cfg.parallel)
    return OtterLlama(cfg.model, n_seq_max=cfg.parallel, n_ctx=cfg.parallel * cfg.ctx_size, n_batch=n_batch,
                      n_ubatch=n_batch, n_threads=cfg.threads, n_threads_batch=cfg.threads_batch or cfg.threads,
                      flash_attn=cfg.flash_attn, verbose=cfg.verbose, **cfg.offload, **kwargs)


def load_drafter(cfg: ServeConfig, llm: Any):
    """``(drafter, drafts per step)`` of ``cfg`` for the served ``llm``: prompt lookup
    (llama-cpp-python's ``LlamaPromptLookupDecoding``) for ``--draft-ngram N``, a
    :class:`~otter_gguf.runtime.draft.DraftLlama` for ``--model-draft`` (its vocabulary checked
    against the base's), ``(None, 0)`` for none; ValueError on a bad setting."""
    from otter_gguf.server.protocol import MAX_DRAFT

    if cfg.draft_ngram is not None and cfg.model_draft is not None:
        raise ValueError("give one of --draft-ngram and --model-draft")
    if cfg.draft_ngram is not None:
        if not 1 <= cfg.draft_ngram <= MAX_DRAFT:
            raise ValueError(f"--draft-ngram must be in 1..{MAX_DRAFT}, got {cfg.draft_ngram}")
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        return LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=cfg.draft_ngram), cfg.draft_ngram
    if cfg.model_draft is not None:
        if not 1 <= cfg.draft_max <= MAX_DRAFT:
            raise ValueError(f"--draft-max must be in 1..{MAX_DRAFT}, got {cfg.draft_max}")
        from otter_gguf.runtime.draft import DraftLlama, check_vocab

        d = DraftLlama(cfg.model_draft, num_pred_tokens=cfg.draft_max, n_ctx=cfg.ctx_size, n_threads=cfg.threads,
                       verbose=cfg.verbose)
        check_vocab(llm._model, cfg.model, d.model, cfg.model_draft)
        return d, cfg.draft_max
    return None, 0
