"""The SentencePiece tokenizer trainer of the test fixtures and the demo model.

One function, :func:`train_sentencepiece`: a BPE model with byte fallback,
split digits and llama's special ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no
pad), trained single-threaded (deterministic). The fixtures
(:func:`otter_gguf.reference.fixtures.train_tokenizer`) and the demo
(:func:`otter_gguf.demo.train.train_tokenizer`) pass their own further
options; the bytes each of them gets are those of their committed
tokenizers.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterable

#: the trainer options both callers share (their own options override these)
DEFAULTS: dict[str, Any] = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    num_threads=1,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
)


def train_sentencepiece(vocab_size: int, *, texts: Iterable[str] | None = None,
                        input_file: str | os.PathLike | None = None, seed: int | None = None,
                        **options: Any) -> bytes:
    """Train a SentencePiece model and return its serialized bytes.

    The training text: ``texts`` (one sentence each) or ``input_file`` (one per
    line; SentencePiece records the path in the model, so the bytes depend on
    it). ``seed``: SentencePiece's random generator seed (None: left as is).
    ``options``: further ``SentencePieceTrainer`` options (e.g.
    ``normalization_rule_name="identity"``, ``hard_vocab_limit=False``).
    """
    import sentencepiece as spm

    if (texts is None) == (input_file is None):
        raise ValueError("train_sentencepiece: give exactly one of texts and input_file")
    if seed is not None:
        spm.set_random_generator_seed(seed)
    source = {"sentence_iterator": iter(texts)} if texts is not None else {"input": str(input_file)}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(model_writer=buf, **source, **{**DEFAULTS, "vocab_size": vocab_size, **options})
    return buf.getvalue()
