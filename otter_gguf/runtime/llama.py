"""OtterLlama: llama-cpp-python's ``Llama`` with the Otter side stream.

``from otter_gguf import OtterLlama`` in place of ``from llama_cpp import Llama``
is the whole migration. On a plain GGUF an OtterLlama is exactly a ``Llama``
(every override delegates unchanged). On an Otter GGUF (docs/FORMAT.md) loaded
by the patched runtime it also

* records the Otter signal of every token it feeds to the model (``eval``
  reads the output rows' signals into a per-position store, like ``scores``),
* attaches those signals to completion and chat results (``choice["otter"]``,
  streamed chunks carry the signals of the tokens they hold),
* scores given text or tokens without sampling (:meth:`OtterLlama.score`),
* steers decoding with the head (``guidance=``, see :mod:`otter_gguf.runtime.guidance`).

The schema of the ``otter`` field and the guidance semantics are documented in
docs/API.md. This class wires llama-cpp-python's hooks (``eval``, ``generate``,
``_create_completion``, state) to the parts that do the work:

* :mod:`.signals`: the :class:`SignalSource` seam (:class:`RuntimeSignalSource`
  reads the patched libllama through :mod:`.capi`; tests may inject another
  source) and the per-position :class:`~.signals.SignalStore`;
* :mod:`.completion`: the ``otter`` blocks of results and streamed chunks;
* :mod:`.guided`: reward guidance during generation (rules in :mod:`.guidance`);
* :mod:`.score`: :meth:`OtterLlama.score` and :class:`OtterScore`.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import weakref
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_lib
from llama_cpp import Llama
from llama_cpp.llama import LogitsProcessorList

from otter_gguf.runtime import backends, capi, guided
from otter_gguf.runtime import score as scoring
from otter_gguf.runtime.capi import otter_runtime_available
from otter_gguf.runtime.completion import CompletionAssembler, CompletionRun, kept_evaluated, record
from otter_gguf.runtime.draft import DraftLlama, check_vocab
from otter_gguf.runtime.guidance import Guidance, ResolvedGuidance
from otter_gguf.runtime.score import OtterScore
from otter_gguf.runtime.signals import RuntimeSignalSource, SignalSource, SignalStore

__all__ = ["OtterLlama", "OtterScore", "SignalSource", "RuntimeSignalSource", "otter_runtime_available"]

_UNSET: Any = object()
_SignalStore = SignalStore  # the name tests/test_api.py imports
_COMPLETION_SIG = inspect.signature(Llama._create_completion)


class OtterLlama(Llama):
    """``llama_cpp.Llama`` plus the Otter side stream (signals, score, guidance).

    Extra keyword arguments (everything else is ``Llama``'s):

    otter: compute the side stream (default ``True``); ``False`` runs at pure
        base speed (no signals, no guidance) until :meth:`set_otter`.
    n_seq_max: parallel sequences of the context (llama.cpp ``n_seq_max``;
        the KV cache is unified when > 1). Scalar-reward guidance with
        ``top_k=k`` needs ``k + 1``.
    guidance: default :class:`~otter_gguf.runtime.guidance.Guidance` (or dict) for
        every completion / chat call that does not pass its own; also sizes
        ``n_seq_max``.
    otter_full_signals: include the full signal rows of token_reward heads
        (``n_vocab`` floats per token) in results; default only for reward
        heads.
    flash_attn: ``True`` / ``False`` as in Llama, or ``"auto"``.
    otter_heads: Otter adapter GGUFs (heads made for this base, docs/FORMAT.md
        "Adapter GGUF") to run beside the model's own head if it has one: a list
        of paths (a head is named by its ``general.name``, else its file stem) or
        a ``{name: path}`` dict. With several heads the signals are named
        ``head/signal`` and concatenated head by head; a token_reward head among several
        contributes its per-candidate row and the one name ``head/token_reward`` (its reward
        of each fed token), and ``head_kind`` is then ``"mixed"`` (docs/API.md).
    rpc_servers: llama.cpp RPC servers (``"HOST:PORT,HOST:PORT"`` or a list; ``--rpc``) whose
        devices the model offloads to, before the local GPUs, with ``Llama``'s ``n_gpu_layers``,
        ``split_mode``, ``main_gpu`` and ``tensor_split``; the Otter layers and their side K/V go
        with their base layers (docs/RUNTIME.md "Backends"). A server that cannot be reached is a
        ValueError naming it.
    """

    def __init__(
        self,
        model_path: str,
        *,
        otter: bool = True,
        n_seq_max: Optional[int] = None,
        guidance: Union[Guidance, dict, None] = None,
        otter_full_signals: Optional[bool] = None,
        otter_heads: Union[Sequence[Union[str, "os.PathLike[str]"]], Dict[str, Any], None] = None,
        rpc_servers: Union[str, Sequence[str], None] = None,
        _signal_source: Optional[Callable[["OtterLlama"], SignalSource]] = None,
        **kwargs: Any,
    ):
        default_guidance = Guidance.coerce(guidance)
        if kwargs.get("draft_model") is not None:
            # llama-cpp-python turns logits_all on for a draft model but sizes `scores` from the argument
            # (n_batch rows), so a context past n_batch tokens fails in eval; ask for it outright
            kwargs["logits_all"] = True
        want_seq = 1 if n_seq_max is None else n_seq_max
        if isinstance(want_seq, bool) or not isinstance(want_seq, int) or want_seq < 1:
            raise ValueError(f"n_seq_max must be an integer >= 1, got {n_seq_max!r}")
        if default_guidance is not None:
            want_seq = max(want_seq, default_guidance.top_k + 1)
        if want_seq > llama_cpp.llama_max_parallel_sequences():
            raise ValueError(f"n_seq_max={want_seq} exceeds llama.cpp's limit of "
                             f"{llama_cpp.llama_max_parallel_sequences()} parallel sequences")
        overrides: Dict[str, Any] = {}
        if want_seq > 1:
            overrides["n_seq_max"] = want_seq
            overrides["kv_unified"] = True
        fa = kwargs.get("flash_attn", False)
        if isinstance(fa, str):
            if fa.lower() not in ("auto", "on", "off"):
                raise ValueError(f"flash_attn must be True, False or 'auto', got {fa!r}")
            kwargs["flash_attn"] = fa.lower() == "on"
            if fa.lower() == "auto":
                overrides["flash_attn_type"] = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        self._otter_ctx_overrides = overrides
        self.rpc_servers = backends.parse_rpc_servers(rpc_servers)
        self._otter_devices = None  # NULL-terminated ggml_backend_dev_t array of the model (rpc_servers)
        if self.rpc_servers:
            devs = backends.rpc_model_devices(self.rpc_servers)  # ValueError naming an unreachable server
            self._otter_devices = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
        self._otter_head_paths = _head_paths(otter_heads)
        self._otter_adapters: List[Any] = []  # (name, llama_adapter_otter *) loaded for the model
        self._otter_requested = bool(otter)
        self._otter_n_seq_max_arg = n_seq_max
        self._otter_guidance_arg = guidance
        self.otter_full_signals = otter_full_signals
        self._otter_src: SignalSource = SignalSource()
        self._otter_store: Optional[SignalStore] = None
        self._otter_enabled = False
        self._otter_blocks: Optional[CompletionAssembler] = None
        self._otter_run: Optional[CompletionRun] = None
        self._otter_pending: Any = _UNSET
        self._otter_scope: Any = _UNSET
        try:
            super().__init__(model_path, **kwargs)
        except ValueError as e:
            raise _explain_load_failure(model_path, e) from None
        if isinstance(self.draft_model, DraftLlama):  # a draft GGUF: its ids must be the base's
            check_vocab(self._model, model_path, self.draft_model.model, self.draft_model.model_path)

        if _signal_source is not None:
            self._otter_src = _signal_source(self)
        else:
            self._otter_load_heads()
            self._otter_src = RuntimeSignalSource(
                self._model.model, self._ctx.ctx, self._otter_adapters,
                model_head_name=os.path.splitext(os.path.basename(model_path))[0])
            if self._otter_adapters:  # their activation re-created the context's memory
                self._ctx.memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        if self._otter_src.has_otter:
            self._otter_store = SignalStore(len(self.input_ids), self._otter_src.n_out,
                                            self._otter_src.head_kind == "token_reward",
                                            layout=self._otter_src.layout)
            me = weakref.proxy(self)  # no reference cycle: the model is freed as soon as it is dropped
            self._otter_blocks = CompletionAssembler(
                self._otter_store, head_kind=self.head_kind, signal_names=self.signal_names,
                detokenize=lambda toks, prev_tokens=None: me.detokenize(toks, prev_tokens=prev_tokens),
                is_eog=lambda t: llama_cpp.llama_vocab_is_eog(me._model.vocab, t))
            self._otter_enabled = True
            if not self._otter_requested:
                self.set_otter(False)
        self._otter_default_guidance = default_guidance
        if default_guidance is not None:
            self._otter_resolve(default_guidance)  # fail at construction on a bad default

    def close(self) -> None:
        # a bad argument fails before Llama.__init__ has made its exit stack; __del__ still calls close
        if "_stack" in self.__dict__:
            super().close()

    # -- context parameter hook: applied when Llama.__init__ creates the context
    @property
    def context_params(self):
        cp = self.__dict__["_otter_cparams"]
        ov = self.__dict__.get("_otter_ctx_overrides") or {}
        if "n_seq_max" in ov:
            cp.n_seq_max = max(int(cp.n_seq_max), ov["n_seq_max"])
        if "kv_unified" in ov:
            cp.kv_unified = ov["kv_unified"]
        if "flash_attn_type" in ov:
            cp.flash_attn_type = ov["flash_attn_type"]
        return cp

    @context_params.setter
    def context_params(self, value) -> None:
        self.__dict__["_otter_cparams"] = value

    # -- model parameter hook: the devices of rpc_servers (llama-cpp-python leaves `devices` NULL)
    @property
    def model_params(self):
        mp = self.__dict__["_otter_mparams"]
        devs = self.__dict__.get("_otter_devices")
        if devs is not None:
            mp.devices = ctypes.cast(devs, ctypes.c_void_p)
        return mp

    @model_params.setter
    def model_params(self, value) -> None:
        self.__dict__["_otter_mparams"] = value

    def _otter_load_heads(self) -> None:
        """Load the ``otter_heads`` adapter GGUFs for the model (checked against the base first);
        the signal source activates them on the context."""
        if not self._otter_head_paths:
            return
        from otter_gguf.io import gguf_read
        from otter_gguf.io.errors import InputError
        from otter_gguf.io.otter_read import read_sidecar

        capi.require("llama_adapter_otter_init", "llama_adapter_otter_name")
        try:
            base = gguf_read.base_info(gguf_read.open_gguf(self.model_path, "model"), self.model_path,
                                     require_supported=False)
        except InputError as e:
            raise ValueError(f"otter_heads: cannot read the base model: {e}") from None
        for name, path in self._otter_head_paths:
            try:
                read_sidecar(path).check_base(base)  # named errors: malformed file, another base
            except InputError as e:
                raise ValueError(f"otter_heads: {e}") from None
            ad = capi.llama_adapter_otter_init(self._model.model, os.fsencode(path))
            if not ad:
                raise ValueError(f"otter_heads: llama.cpp refused the Otter head {path} (see its error log)")
            if name is None:
                name = (capi.llama_adapter_otter_name(ad) or b"").decode("utf-8", errors="replace") or \
                    os.path.splitext(os.path.basename(path))[0]
            self._otter_adapters.append((name, ad))

    @property
    def otter_heads(self) -> List[Any]:
        """The heads the context runs, in signal order (:class:`~.signals.OtterHead`: name, n_out,
        head_kind, signal_names); a row of ``signals`` is their rows concatenated."""
        return list(self._otter_src.heads)

    # ------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------
    @property
    def has_otter(self) -> bool:
        """True when the model carries an Otter head (and the runtime reads it)."""
        return bool(self._otter_src.has_otter)

    @property
    def n_out(self) -> int:
        """Signals per token (0 without an Otter head)."""
        return int(self._otter_src.n_out) if self.has_otter else 0

    @property
    def head_kind(self) -> Optional[str]:
        """``"reward"`` / ``"token_reward"``; ``"mixed"`` for several heads with a token_reward head
        among them (None without an Otter head)."""
        return self._otter_src.head_kind if self.has_otter else None

    @property
    def signal_names(self) -> List[str]:
        """Names of a reward head's signals (empty for one token_reward head / no head); ``head/signal``
        with several heads (a token_reward head's: ``head/token_reward``)."""
        return list(self._otter_src.signal_names) if self.has_otter else []

    @property
    def otter_enabled(self) -> bool:
        """True while the side stream is computed."""
        return self.has_otter and self._otter_enabled

    @property
    def n_seq_max(self) -> int:
        return int(llama_cpp.llama_n_seq_max(self._ctx.ctx))

    @property
    def signals(self) -> np.ndarray:
        """Signals of the evaluated positions ``[n_tokens, n_out]`` (NaN where not
        computed), the Otter counterpart of ``scores``."""
        self._require_otter("signals")
        return self._otter_store.array(self.n_tokens)

    def set_otter(self, enabled: bool) -> None:
        """Turn the side stream on or off (off: base speed, no signals)."""
        enabled = bool(enabled)
        if enabled and not self.has_otter:
            raise ValueError(self._no_head_message("set_otter(True)"))
        if not self.has_otter:
            return
        self._otter_src.set_enabled(enabled)
        self._otter_enabled = enabled

    # ------------------------------------------------------------------
    # errors
    # ------------------------------------------------------------------
    def _no_head_message(self, what: str) -> str:
        meta = getattr(self, "metadata", {}) or {}
        if any(k.startswith("otter.") for k in meta):
            return (f"{what}: {self.model_path} carries Otter metadata but the loaded llama.cpp runtime does "
                    f"not provide the Otter API; install the patched runtime (`otter-gguf build-runtime`)")
        return (f"{what}: the model {self.model_path} has no Otter head (a plain GGUF); convert an Otter "
                f"adapter with `otter-gguf convert` to get signals")

    def _require_otter(self, what: str) -> None:
        if not self.has_otter:
            raise ValueError(self._no_head_message(what))
        if not self._otter_enabled:
            raise ValueError(f"{what}: the Otter side stream is turned off (otter=False / set_otter(False)); "
                             f"call set_otter(True) first")

    def _otter_reading(self) -> bool:
        return self.has_otter and self._otter_enabled and self._otter_store is not None

    def _otter_resolve(self, g: Optional[Guidance]) -> Optional[ResolvedGuidance]:
        if g is None:
            return None
        self._require_otter("guidance")
        r = guided.resolve(g, self)
        if r.batched and self.draft_model is not None:
            raise ValueError("guidance on a scalar reward signal cannot run with a draft_model: each step scores "
                             f"top_k={r.top_k} candidates as parallel sequences, one token each, so there is no "
                             "single draft to verify; use a token_reward head (its guided distribution comes out "
                             "of the verify pass) or no draft_model")
        if r.batched:
            need = r.top_k + 1
            have = self.n_seq_max
            if have < need:
                raise ValueError(
                    f"reward guidance with top_k={r.top_k} scores the candidates as {r.top_k} parallel "
                    f"sequences and needs a context with n_seq_max >= {need} (this one has {have}); "
                    f"construct OtterLlama(..., n_seq_max={need}) or OtterLlama(..., guidance=...)")
            if r.top_k > self.n_batch:
                raise ValueError(f"guidance top_k={r.top_k} exceeds n_batch={self.n_batch}")
        return r

    # ------------------------------------------------------------------
    # decoding hooks
    # ------------------------------------------------------------------
    def sample(self, *args, idx: Optional[int] = None, **kwargs):
        """``Llama.sample``; token_reward guidance reads the signal row of the sampled row's position
        (``idx``: a verified draft's under speculative decoding, else the last fed token's)."""
        self._otter_sample_idx = idx
        try:
            return super().sample(*args, idx=idx, **kwargs)
        finally:
            self._otter_sample_idx = None

    def _otter_position(self) -> int:
        """The position whose signal row guides the token being sampled."""
        idx = getattr(self, "_otter_sample_idx", None)
        return idx if idx is not None else self.n_tokens - 1

    def reset(self):
        super().reset()
        if self._otter_store is not None:
            self._otter_store.truncate(0)

    def eval(self, tokens: Sequence[int]):
        """Evaluate tokens (as ``Llama.eval``) and record the signals of the
        output rows: the last token of each decode, every token with
        ``logits_all``."""
        if not self._otter_reading():
            return super().eval(tokens)
        st = self._otter_store
        tokens = list(tokens)
        st.truncate(self.n_tokens)
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i: i + self.n_batch]
            n_past = self.n_tokens
            super().eval(chunk)
            rows = range(len(chunk)) if self._logits_all else (len(chunk) - 1,)
            st.note_token(n_past, chunk[0])
            st.hold_from = n_past  # every row of this decode (a draft's is sampled after the rows before it)
            for r in rows:
                p = n_past + r
                st.put(p, self._otter_src.read_row(r, lambda p=p: self.input_ids[: p + 1].tolist()))
                if r + 1 < len(chunk):
                    st.note_token(p + 1, chunk[r + 1])

    def generate(
        self,
        tokens: Sequence[int],
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        penalize_nl: bool = True,
        logits_processor: Optional[LogitsProcessorList] = None,
        stopping_criteria=None,
        grammar=None,
    ):
        run = self._otter_run
        kw = dict(top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temp,
                  repeat_penalty=repeat_penalty, reset=reset, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                  mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, penalize_nl=penalize_nl,
                  logits_processor=logits_processor, stopping_criteria=stopping_criteria, grammar=grammar)
        if run is None or not self._otter_reading():
            return super().generate(tokens, **kw)
        self._otter_run = None  # one generate per completion call
        tokens = list(tokens)
        run.prompt_len = len(tokens)
        run.generated = []
        g = run.guidance
        if self._otter_store.has_token_heads and self.otter_full_signals:
            self._otter_store.keep_from = max(0, len(tokens) - 1)
        else:
            self._otter_store.keep_from = None
        if g is not None and g.batched:
            inner = guided.generate_batched(self, tokens, g, run, temp=temp, repeat_penalty=repeat_penalty,
                                            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                            logits_processor=logits_processor,
                                            stopping_criteria=stopping_criteria, grammar=grammar, reset=reset)
        else:
            if g is not None:
                kw["logits_processor"] = LogitsProcessorList(
                    [*(logits_processor or []),
                     guided.token_processor(g, run, self._otter_store, self._otter_position,
                                            guided.GrammarMask(self._model, grammar) if grammar else None)])
            self._otter_refresh_last_row(tokens)
            inner = super().generate(tokens, **kw)
        return record(inner, run)

    def _otter_refresh_last_row(self, tokens: List[int]) -> None:
        """If the whole prompt is cached but its last signal row is not known
        (computed with the side stream off, or restored), make ``generate``
        replay the last prompt token."""
        n = len(tokens)
        if (n > 0 and self.n_tokens == n and not self._requires_eval
                and self._otter_store.get(n - 1) is None
                and self._input_ids.tolist() == tokens):
            self._requires_eval = True

    # ------------------------------------------------------------------
    # completions
    # ------------------------------------------------------------------
    def create_completion(self, prompt, *args, guidance: Any = _UNSET, **kwargs):
        """``Llama.create_completion`` plus ``guidance=`` (a
        :class:`~otter_gguf.runtime.guidance.Guidance`, a dict or None). On an Otter
        model each choice carries an ``otter`` field (docs/API.md)."""
        if guidance is not _UNSET:
            self._otter_pending = Guidance.coerce(guidance)
        try:
            return super().create_completion(prompt, *args, **kwargs)
        finally:
            self._otter_pending = _UNSET

    def __call__(self, prompt, *args, guidance: Any = _UNSET, **kwargs):
        if guidance is not _UNSET:
            self._otter_pending = Guidance.coerce(guidance)
        try:
            return super().__call__(prompt, *args, **kwargs)
        finally:
            self._otter_pending = _UNSET

    def create_chat_completion(self, *args, guidance: Any = _UNSET, **kwargs):
        """``Llama.create_chat_completion`` plus ``guidance=``; on an Otter model
        ``choices[0]["otter"]`` (and each streamed chunk's) holds the signals
        of the generated tokens."""
        prev = self._otter_scope
        if guidance is not _UNSET:
            self._otter_scope = Guidance.coerce(guidance)
        blocks = self._otter_blocks
        if blocks is not None:
            blocks.last_block = blocks.last_chunk_block = None
        try:
            out = super().create_chat_completion(*args, **kwargs)
        finally:
            self._otter_scope = prev
        if not self._otter_reading():
            return out
        if isinstance(out, dict):
            if out.get("choices"):
                out["choices"][0]["otter"] = blocks.last_block
            return out
        return blocks.chat_stream(out)

    def _create_completion(self, *args, **kwargs):
        g = self._otter_pending
        self._otter_pending = _UNSET
        if g is _UNSET:
            g = self._otter_scope
        if g is _UNSET:
            g = getattr(self, "_otter_default_guidance", None)
        if not self._otter_reading():
            if g is not None:
                self._require_otter("guidance")
            return super()._create_completion(*args, **kwargs)
        bound = _COMPLETION_SIG.bind(self, *args, **kwargs)
        bound.apply_defaults()
        resolved = self._otter_resolve(g)
        run = CompletionRun(guidance=resolved, prompt=bound.arguments["prompt"], echo=bool(bound.arguments["echo"]),
                            full_signals=bool(self.otter_full_signals))
        inner = super()._create_completion(*args, **kwargs)
        step, finish = partial(self._otter_next, inner, run), partial(self._otter_finish, run)
        if bound.arguments["stream"]:
            return self._otter_blocks.stream(run, inner, step, finish, lambda: kept_evaluated(run, self._input_ids))
        return self._otter_blocks.single(run, inner, step, finish)

    def _otter_next(self, inner, run: CompletionRun):
        prev = self._otter_run
        self._otter_run = run if run.prompt_len < 0 else None
        try:
            return next(inner)
        finally:
            self._otter_run = prev

    def _otter_finish(self, run: CompletionRun) -> None:
        """Make the last completion token's signal the kept token's: one extra decode of it when it
        was never fed, or when a draft sits at its position (speculative decoding: the draft's row
        was computed, the sampler chose another token, and generation stopped before the rejection
        rolled the context back). The rows of the tokens before it are already the kept ones."""
        toks = self._otter_blocks.completion_tokens(run)
        if not toks or run.prompt_len < 0:
            return
        p = run.prompt_len + len(toks) - 1
        if p >= self._n_ctx:
            return
        kept = kept_evaluated(run, self._input_ids)
        if kept < p or (kept > p and self._otter_store.get(p) is not None):
            return
        if self.n_tokens > p:  # drop the draft at p and what follows, as generate() does on a rejection
            self._ctx.kv_cache_seq_rm(-1, p, -1)
            self.n_tokens = p
        self.eval([toks[-1]])

    # ------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------
    def score(self, text: Optional[str] = None, *, tokens: Optional[Sequence[int]] = None,
              add_bos: bool = True, special: bool = True) -> OtterScore:
        """Per-token Otter signals of ``text`` (tokenized like a completion
        prompt) or of ``tokens``, without sampling. Uses the runtime's
        all-positions mode: signals for every token, vocab logits only for the
        last one. Leaves the context holding the scored sequence (for prefix
        reuse by the next completion; not with ``logits_all``)."""
        return scoring.score(self, text, tokens=tokens, add_bos=add_bos, special=special)

    # ------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------
    def save_state(self):
        state = super().save_state()
        if self._otter_store is not None:
            state.otter = self._otter_store.snapshot(self.n_tokens)
        return state

    def load_state(self, state) -> None:
        super().load_state(state)
        snap = getattr(state, "otter", None)
        if self._otter_store is not None:
            if snap is not None:
                self._otter_store.restore(snap)
            else:
                self._otter_store.truncate(0)

    def __getstate__(self):
        d = super().__getstate__()
        d.update(otter=self._otter_requested, n_seq_max=self._otter_n_seq_max_arg,
                 rpc_servers=",".join(self.rpc_servers) or None,
                 otter_heads={n: p for (n, _), (_, p) in zip(self._otter_adapters, self._otter_head_paths)} or None,
                 guidance=self._otter_guidance_arg, otter_full_signals=self.otter_full_signals)
        fa = self._otter_ctx_overrides.get("flash_attn_type")
        if fa == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO:
            d["flash_attn"] = "auto"
        return d


def _head_paths(heads) -> List[Any]:
    """[(name or None, path)] of the ``otter_heads`` argument."""
    if heads is None:
        return []
    if isinstance(heads, (str, bytes, os.PathLike)):
        heads = [heads]
    items = list(heads.items()) if isinstance(heads, dict) else [(None, h) for h in heads]
    out = []
    for name, path in items:
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(f"otter_heads: a head name must be a non-empty string without '/', got {name!r}")
        p = os.fspath(path)
        if not os.path.isfile(p):
            raise ValueError(f"otter_heads: {p}: no such file")
        out.append((name, p))
    return out


def _explain_load_failure(model_path: str, err: ValueError) -> ValueError:
    """A GGUF with Otter tensors fails to load in a runtime without Otter
    support ("wrong number of tensors"); say so."""
    if "Failed to load model" not in str(err) or not os.path.isfile(model_path):
        return err
    if capi.available(*capi.MODEL_FUNCTIONS):
        return err
    try:
        from gguf import GGUFReader

        r = GGUFReader(model_path, "r")
        has = any(k.startswith("otter.") for k in r.fields)
    except Exception:
        return err
    if not has:
        return err
    return ValueError(f"{err}: {model_path} is an Otter GGUF and the loaded llama.cpp runtime "
                      f"({llama_cpp_lib._lib._name}) has no Otter support; install the patched runtime "
                      f"with `otter-gguf build-runtime`")
