"""otter-gguf converter: Otter adapter + base model -> one Otter GGUF.

Public API::

    convert(adapter_dir, base, out, *, outtype="f32", base_outtype="f16",
            head_type=None, force=False, progress=True) -> pathlib.Path
    convert_hf_base(hf_dir, out_gguf, outtype="f32") -> pathlib.Path
    inspect_gguf(path) -> dict

See docs/FORMAT.md for the file layout and the output types.
"""

from otter_gguf.format.constants import gguf_tensor_name
from otter_gguf.io.gguf_read import vocab_hash_tokens
from otter_gguf_converter.convert import convert, rope_permute, rope_unpermute
from otter_gguf_converter.errors import ConvertError
from otter_gguf_converter.hf_base import BASE_OUTTYPES, convert_hf_base
from otter_gguf_converter.inspect import inspect_gguf
from otter_gguf_converter.qtypes import HEAD_TYPES, OUTTYPES

__all__ = [
    "BASE_OUTTYPES",
    "ConvertError",
    "HEAD_TYPES",
    "OUTTYPES",
    "convert",
    "convert_hf_base",
    "gguf_tensor_name",
    "inspect_gguf",
    "rope_permute",
    "rope_unpermute",
    "vocab_hash_tokens",
]
