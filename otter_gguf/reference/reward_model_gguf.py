"""The reward-model GGUF: a separate model llama.cpp runs beside the base (the baseline of docs/EVAL.md).

The base's tensors minus the LM head (``output.weight``) under the architecture ``<arch>-embed`` (llama.cpp's
``llama-embed``: the llama graph without the LM head, causal attention), the tensors a reward model fine-tuned
written over the base's own (matrices as ``matrix_type``, default Q8_0, with ggml's quantizer
(:mod:`otter_gguf.io.ggml_quant`); vectors as F32. Not the base's own type: fine-tuning moves a weight by far
less than a 4-bit step, so re-encoding it as a Q4 base would round the fine-tuning away. A ``llama`` model's
Q/K rows are permuted to llama.cpp's RoPE layout as the converter does), and its linear score head in the metadata (``reward_model.*``: llama.cpp loads no tensor it
does not know, so the head is read by the caller: ``hidden @ score.weight.T + score.bias`` on the hidden states
of an embeddings context). ``bench``'s reward-model stand-in is this file without a score head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from otter_gguf.io import gguf_read
from otter_gguf.io.errors import InputError

__all__ = ["RM_ARCHITECTURES", "Keys", "ScoreHead", "read_score_head", "write_reward_model_gguf"]

#: the architectures with an ``-embed`` twin in the pinned llama.cpp
RM_ARCHITECTURES = ("llama",)


class Keys:
    SCORE_WEIGHT = "reward_model.score.weight"          # f32 array, n_out * d, row-major [n_out, d]
    SCORE_BIAS = "reward_model.score.bias"              # f32 array, n_out
    SIGNAL_NAMES = "reward_model.signal_names"          # string array, n_out
    TRAINABLE_LAYERS = "reward_model.trainable_layers"  # u32: the top layers it fine-tuned


@dataclass
class ScoreHead:
    weight: np.ndarray      # [n_out, d] float32
    bias: np.ndarray        # [n_out] float32
    signal_names: list[str]
    trainable_layers: int

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """Rewards ``[.., n_out]`` of hidden states ``[.., d]``."""
        return np.asarray(hidden, np.float32) @ self.weight.T + self.bias


def write_reward_model_gguf(base: str | os.PathLike, out: str | os.PathLike, *,
                            tensors: Optional[Mapping[str, np.ndarray]] = None,
                            head: Optional[ScoreHead] = None, matrix_type: str = "q8_0",
                            force: bool = True) -> Path:
    """Write the reward-model GGUF of ``base`` to ``out`` (atomically). ``tensors``: HF-named float arrays
    that replace the base's (the fine-tuned layers: matrices encoded as ``matrix_type``, vectors F32);
    ``head``: the score head (None: none, the bench's stand-in)."""
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFValueType

    from otter_gguf.io.ggml_quant import encode

    from otter_gguf.io.gguf_write import OutTensor, copy_kvs, raw_tensors, write_gguf
    from otter_gguf.io.outputs import atomic_outputs
    from otter_gguf.reference.gguf_base import hf_tensor_to_gguf
    from otter_gguf_converter import rope_permute

    reader = gguf_read.open_gguf(base, "base")
    arch = gguf_read.field_value(reader, "general.architecture")
    if arch not in RM_ARCHITECTURES:
        raise InputError(f"{base}: a reward model of a {arch} base is not supported (llama.cpp has an "
                         f"-embed architecture for: {', '.join(RM_ARCHITECTURES)})")
    new = f"{arch}-embed"
    replaced: dict[str, np.ndarray] = {}
    if tensors:
        h = int(gguf_read.field_value(reader, f"{arch}.attention.head_count"))
        hkv = int(gguf_read.field_value(reader, f"{arch}.attention.head_count_kv") or h)
        for hf, arr in tensors.items():
            a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
            if hf.endswith(("q_proj.weight", "q_proj.bias")):
                a = rope_permute(a, h)
            elif hf.endswith(("k_proj.weight", "k_proj.bias")):
                a = rope_permute(a, hkv)
            replaced[hf_tensor_to_gguf(hf, arch)] = np.ascontiguousarray(a)
    names = {t.name for t in reader.tensors}
    missing = sorted(set(replaced) - names)
    if missing:
        raise InputError(f"{base}: has no tensor(s) {', '.join(missing[:4])} to replace")
    out_tensors = []
    for t in raw_tensors(reader, lambda n: n != "output.weight"):
        if t.name in replaced:
            a = replaced[t.name]
            if tuple(a.shape) != tuple(t.np_shape):
                raise InputError(f"{t.name}: replacement has shape {list(a.shape)}, the base's is "
                                 f"{list(t.np_shape)}")
            qt = QT[matrix_type.upper()] if a.ndim == 2 else QT.F32
            enc = encode(a, qt)
            t = OutTensor(t.name, t.np_shape, qt, int(enc.nbytes), lambda enc=enc: enc, f"{t.name} {qt.name}")
        out_tensors.append(t)
    kvs = [copy_kvs(reader, rename=lambda k: new + k[len(arch):] if k.startswith(arch + ".") else k,
                    replace={"general.architecture": (new, GGUFValueType.STRING)})]
    if head is not None:
        d = int(gguf_read.field_value(reader, f"{arch}.embedding_length"))
        if head.weight.shape != (len(head.signal_names), d) or head.bias.shape != (len(head.signal_names),):
            raise InputError(f"score head of shape {list(head.weight.shape)} / {list(head.bias.shape)} does not "
                             f"fit a base of width {d} with {len(head.signal_names)} signal(s)")

        def add_head(w) -> None:
            w.add_bool(f"{new}.attention.causal", True)
            w.add_array(Keys.SCORE_WEIGHT, [float(x) for x in head.weight.astype(np.float32).ravel()])
            w.add_array(Keys.SCORE_BIAS, [float(x) for x in head.bias.astype(np.float32).ravel()])
            w.add_array(Keys.SIGNAL_NAMES, list(head.signal_names))
            w.add_uint32(Keys.TRAINABLE_LAYERS, int(head.trainable_layers))

        kvs.append(add_head)
    with atomic_outputs([Path(out)], force=force) as (tmp,):
        write_gguf(tmp, new, int(reader.alignment), kvs, out_tensors)
    return Path(out)


def read_score_head(path: str | os.PathLike) -> ScoreHead:
    """The score head of a reward-model GGUF; InputError if the file has none (a plain GGUF, or the bench's
    stand-in) or it is malformed."""
    reader = gguf_read.open_gguf(path, "reward model")
    arch = gguf_read.field_value(reader, "general.architecture")
    w, b = gguf_read.field_value(reader, Keys.SCORE_WEIGHT), gguf_read.field_value(reader, Keys.SCORE_BIAS)
    names = gguf_read.field_value(reader, Keys.SIGNAL_NAMES)
    if w is None or b is None or names is None:
        raise InputError(f"{path}: not a reward-model GGUF (no {Keys.SCORE_WEIGHT} / {Keys.SCORE_BIAS} / "
                         f"{Keys.SIGNAL_NAMES}; made by `otter-gguf eval --quality`)")
    d = gguf_read.field_value(reader, f"{arch}.embedding_length")
    n = len(names)
    if not d or len(w) != n * int(d) or len(b) != n:
        raise InputError(f"{path}: score head of {len(w)} + {len(b)} floats does not fit width {d} and "
                         f"{n} signal(s) (expected {n} x {d} + {n})")
    return ScoreHead(np.asarray(w, np.float32).reshape(n, int(d)), np.asarray(b, np.float32), list(names),
                     int(gguf_read.field_value(reader, Keys.TRAINABLE_LAYERS) or 0))
