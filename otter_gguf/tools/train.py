"""``otter-gguf train``: fit an Otter adapter on a frozen base, from HF weights or from a GGUF.

The base is an HF checkpoint directory (its tokenizer via transformers) or a
base GGUF of a supported architecture: "train on the GGUF you serve" — the
tensors are dequantized with gguf-py and brought back to the HF layout
(:func:`otter_gguf.reference.gguf_base.load_base_gguf`) and the text is
tokenized by the GGUF's own tokenizer (llama.cpp's, through llama-cpp-python
with ``vocab_only=True``) and chat template, exactly as the runtime will
tokenize it. Data: :mod:`otter_gguf.reference.data`; loop:
:func:`otter_gguf.reference.training.fit`. The output adapter directory is
written to a temporary sibling and renamed, so a failed run leaves nothing
behind; ``gguf=`` also converts it with ``otter-gguf convert``'s code: to one
Otter GGUF (base + head), or with ``sidecar=True`` to a head-only adapter GGUF
that loads beside the base.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from otter_gguf.format.adapter import save_adapter
from otter_gguf.reference.data import (
    Dataset,
    HFTokenizer,
    TrainDataError,
    load_jsonl,
    split_heldout,
)
from otter_gguf.reference.gguf_base import load_base_gguf
from otter_gguf.reference.model import BaseModel, OtterModel, insert_otter, load_base
from otter_gguf.reference.training import default_device, fit

__all__ = ["GGUFTokenizer", "TrainError", "TrainSettings", "default_shape", "is_gguf", "load_training_base",
           "train"]

METRICS_FILE = "train_metrics.json"


class TrainError(ValueError):
    """A training run that cannot start (bad settings, output in the way)."""


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


class GGUFTokenizer:
    """A GGUF's own tokenizer (llama.cpp via llama-cpp-python, ``vocab_only``) and chat template.

    ``encode`` tokenizes as :meth:`OtterLlama.score` does (BOS per the GGUF,
    special tokens parsed) and maps every token's bytes back to character
    offsets of the text."""

    def __init__(self, path: str | os.PathLike):
        from llama_cpp import Llama

        from otter_gguf.io.llama_log import llama_logs

        with llama_logs(log_level=None):  # llama.cpp's notes about a vocab-only context
            self.llm = Llama(os.fspath(path), vocab_only=True, verbose=False)
        self.vocab_size = int(self.llm.n_vocab())
        self.template = self.llm.metadata.get("tokenizer.chat_template")

    def _piece(self, t: int) -> bytes:
        return self.llm.detokenize([t], special=True)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        data = text.encode("utf-8")
        ids = self.llm.tokenize(data, add_bos=True, special=True)
        char_of = [0] * (len(data) + 1)
        c = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            for k in range(n):
                char_of[c + k] = i
            c += n
        char_of[len(data)] = len(text)
        offsets = []
        pos = 0
        for t in ids:
            piece = self._piece(t)
            if piece and data.startswith(piece, pos):
                a, b = pos, pos + len(piece)
            elif piece.startswith(b" ") and data.startswith(piece[1:], pos) and len(piece) > 1:
                a, b = pos, pos + len(piece) - 1  # SentencePiece's leading space
            else:  # a token not spelled in the text (BOS)
                offsets.append((char_of[pos], char_of[pos]))
                continue
            offsets.append((char_of[a], char_of[b] if b < len(data) else len(text)))
            pos = b
        return list(ids), offsets

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.template:
            raise ValueError("the GGUF has no chat template (tokenizer.chat_template); use \"text\" records")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos = self._piece(self.llm.token_bos()).decode("utf-8", "replace") if self.llm.token_bos() >= 0 else ""
        eos = self._piece(self.llm.token_eos()).decode("utf-8", "replace") if self.llm.token_eos() >= 0 else ""
        fmt = Jinja2ChatFormatter(self.template, eos_token=eos, bos_token=bos,
                                  add_generation_prompt=add_generation_prompt)
        return fmt(messages=messages).prompt


def load_training_base(base: str | os.PathLike):
    """(BaseModel, tokenizer, name) of an HF directory or a base GGUF."""
    p = Path(base)
    if p.is_dir():
        return load_base(p), HFTokenizer(p), p.name
    if is_gguf(p):
        model = load_base_gguf(p)
        name = None
        try:
            from gguf import GGUFReader

            f = GGUFReader(os.fspath(p), "r").fields.get("general.name")
            name = f.contents() if f is not None else None
        except Exception:  # noqa: BLE001 - the name is cosmetic
            pass
        return model, GGUFTokenizer(p), f"{name or p.stem} ({p.name})"
    if not p.exists():
        raise TrainError(f"base {p}: no such file or directory (expected an HF model directory or a GGUF file)")
    raise TrainError(f"base {p} is neither an HF model directory nor a GGUF file")


def default_shape(base: BaseModel) -> dict[str, int]:
    """A small side stream: one side head (h2 = h2_kv = 1), d2 = 32 (rows of d + 32
    stay a multiple of 32, the block of q8_0/q4_0), f2 = d2."""
    return {"d2": 32, "h2": 1, "h2_kv": 1, "f2": 32}


@dataclass
class TrainSettings:
    objective: str | None = None
    heldout: float = 0.1
    d2: int | None = None
    h2: int | None = None
    h2_kv: int | None = None
    f2: int | None = None
    signal_name: str = "reward"
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 3e-4
    batch_size: int = 8
    seed: int = 0
    max_length: int = 1024
    checkpoint_every: int = 100
    eval_every: int = 0
    save_dtype: str = "bfloat16"


def _replace_dir(tmp: Path, out: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train(
    base: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    settings: TrainSettings | None = None,
    *,
    eval_data: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    threads: int | None = None,
    gguf: str | os.PathLike | None = None,
    outtype: str = "q8_0",
    sidecar: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train an Otter head on ``base`` with the JSONL file ``data``; write the adapter to ``out``.

    Returns the report written to ``out/train_metrics.json``: settings, data
    sizes, held-out metrics, loss curve summary, time and tokens/s.
    """
    s = settings or TrainSettings()
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise TrainError(f"output {out} already exists; pass --force to replace it")
    if gguf is not None and Path(gguf).exists() and not force:
        raise TrainError(f"--gguf {gguf} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise TrainError(f"output directory {out.parent} does not exist")
    if threads:
        torch.set_num_threads(threads)

    t_load = time.perf_counter()
    model_base, tokenizer, base_name = load_training_base(base)
    ds = load_jsonl(data, tokenizer, objective=s.objective, max_length=s.max_length)
    if eval_data is not None:
        train_ds = ds
        held_ds = load_jsonl(eval_data, tokenizer, objective=ds.objective, max_length=s.max_length)
    else:
        train_ds, held_ds = split_heldout(ds, s.heldout, s.seed)
    _check_vocab(train_ds, model_base)
    _check_vocab(held_ds, model_base)
    shape = default_shape(model_base)
    for k in ("d2", "h2", "h2_kv", "f2"):
        if getattr(s, k) is not None:
            shape[k] = int(getattr(s, k))
    token_head = ds.objective == "next_token"
    try:
        config, tensors = insert_otter(
            model_base, **shape, head_kind="token_reward" if token_head else "reward",
            n_out=None, signal_names=None if token_head else [s.signal_name], init="copy", seed=s.seed,
            base_model=base_name)
    except ValueError as e:
        raise TrainError(f"cannot insert Otter with {shape}: {e}") from None
    model = OtterModel(model_base, config, tensors)
    steps = s.steps or max(1, math.ceil(s.epochs * len(train_ds) / s.batch_size))
    dev = device or default_device()
    say(f"otter-gguf train: base {base_name}: d={model_base.config.hidden_size}, "
        f"{model_base.config.num_hidden_layers} layers; {ds.objective} on {len(train_ds)} records "
        f"({train_ds.n_tokens()} tokens), held-out {len(held_ds)}; side d2={shape['d2']} h2={shape['h2']} "
        f"h2_kv={shape['h2_kv']} f2={shape['f2']}; {steps} steps of {s.batch_size} on {dev} "
        f"(loaded in {time.perf_counter() - t_load:.1f}s)")
    result = fit(model, ds.objective, train_ds.examples, held_ds.examples, steps=steps, lr=s.lr,
                 batch_size=s.batch_size, seed=s.seed, checkpoint=checkpoint,
                 checkpoint_every=s.checkpoint_every, resume=resume, eval_every=s.eval_every,
                 progress=progress, device=dev, log=say)
    report = {
        "base": base_name,
        "objective": ds.objective,
        "head_kind": config.head_kind,
        "signal_names": list(config.signal_names),
        "shape": shape,
        "settings": {k: v for k, v in asdict(s).items()} | {"steps": steps, "device": dev},
        "data": {"train_records": len(train_ds), "train_tokens": train_ds.n_tokens(),
                 "heldout_records": len(held_ds), "heldout_tokens": held_ds.n_tokens()},
        "heldout": result.metrics,
        "evals": result.evals,
        "loss_first": result.history[0] if result.history else None,
        "loss_last20": sum(result.history[-20:]) / max(1, len(result.history[-20:])),
        "train_seconds": round(result.seconds, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "torch_threads": torch.get_num_threads(),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_adapter(tmp, config, model.tensors, dtype=s.save_dtype)
        (tmp / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out} (held-out: {json.dumps(result.metrics)})")
    if gguf is not None:
        from otter_gguf_converter import convert

        convert(out, base if is_gguf(base) else Path(base), Path(gguf), outtype=outtype, force=force,
                progress=progress, sidecar=sidecar)
        say(f"wrote {gguf} ({outtype}{', head only: an adapter GGUF beside the base' if sidecar else ''})")
    return report


def _check_vocab(ds: Dataset, base: BaseModel) -> None:
    V = base.config.vocab_size
    for ex in ds.examples:
        for seq in (ex.tokens, ex.rejected or ()):
            if seq and max(seq) >= V:
                raise TrainDataError(f"{ds.path}:{ex.line}: token id {max(seq)} out of the base's "
                                     f"vocabulary [0, {V})")
