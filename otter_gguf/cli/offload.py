"""The offload options of ``run``, ``score``, ``serve``, ``eval`` and ``bench``, spelled as llama.cpp's
tools spell them: ``-ngl/--n-gpu-layers``, ``-sm/--split-mode``, ``-mg/--main-gpu``,
``-ts/--tensor-split``, ``--rpc``. :func:`offload_options` adds them to a command and
:func:`offload_kwargs` turns their values into the ``OtterLlama`` (``llama_cpp.Llama``) arguments."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import click

#: --split-mode -> llama_split_mode (llama.h)
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2, "tensor": 3}


class _GpuLayers(click.ParamType):
    """-ngl: a number of layers, or ``all`` (llama-cpp-python's -1: every layer)."""

    name = "N|all"

    def convert(self, value: Any, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "all":
            return -1
        if text.isdigit():
            return int(text)
        self.fail(f"{value!r} is not a number of layers >= 0 or 'all'", param, ctx)


def parse_tensor_split(value: Optional[str]) -> Optional[List[float]]:
    """``-ts 3,1`` (``,`` or ``/`` between proportions, as llama.cpp parses it) -> [3.0, 1.0]."""
    if value is None or not value.strip():
        return None
    parts = [p for p in re.split(r"[,/]+", value.strip()) if p]
    try:
        out = [float(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected proportions such as 3,1", param_hint="--tensor-split") from None
    if any(not (x >= 0) for x in out) or not any(x > 0 for x in out):
        raise click.BadParameter(f"{value!r}: proportions must be >= 0 and not all 0", param_hint="--tensor-split")
    return out


def offload_options(f):
    """Add the offload options to a click command (their values reach it as keyword arguments)."""
    opts = [
        click.option("-ngl", "--n-gpu-layers", "--gpu-layers", "n_gpu_layers", type=_GpuLayers(), default=0,
                     show_default=True,
                     help="Layers to offload to the GPU / RPC devices (a number, or 'all'); the Otter "
                          "side-stream layers go with their base layers."),
        click.option("-sm", "--split-mode", type=click.Choice(list(SPLIT_MODES)), default="layer", show_default=True,
                     help="How to split the model across devices (llama.cpp's --split-mode)."),
        click.option("-mg", "--main-gpu", type=click.IntRange(min=0), default=0, show_default=True,
                     help="The device for the whole model with --split-mode none."),
        click.option("-ts", "--tensor-split", default=None, metavar="N0,N1,...",
                     help="Proportion of the offloaded layers for each device, e.g. 3,1."),
        click.option("--rpc", "rpc", default=None, metavar="HOST:PORT,...",
                     help="RPC servers (`otter-gguf rpc-server`) to offload to, before the local GPUs."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def offload_kwargs(n_gpu_layers: int = 0, split_mode: str = "layer", main_gpu: int = 0,
                   tensor_split: Optional[str] = None, rpc: Optional[str] = None) -> Dict[str, Any]:
    """The ``OtterLlama`` keyword arguments of the option values (only those that differ from
    ``Llama``'s defaults); a bad or unreachable ``--rpc`` or a bad ``--tensor-split`` is a usage error (exit 2)."""
    from otter_gguf.runtime.backends import check_reachable, parse_rpc_servers

    kw: Dict[str, Any] = {}
    if n_gpu_layers:
        kw["n_gpu_layers"] = n_gpu_layers
    if split_mode != "layer":
        kw["split_mode"] = SPLIT_MODES[split_mode]
    if main_gpu:
        kw["main_gpu"] = main_gpu
    ts = parse_tensor_split(tensor_split)
    if ts is not None:
        kw["tensor_split"] = ts
    if rpc is not None:
        try:
            servers = parse_rpc_servers(rpc)
            for ep in servers:  # before any model loads (bench and eval load them in other processes)
                check_reachable(ep)
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix("rpc_servers: "), param_hint="--rpc") from None
        if not servers:
            raise click.BadParameter("no HOST:PORT given", param_hint="--rpc")
        kw["rpc_servers"] = ",".join(servers)
    return kw


def pop_offload(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Take the offload option values out of a command's ``kwargs`` and return their OtterLlama arguments."""
    return offload_kwargs(**{k: kwargs.pop(k) for k in ("n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "rpc")
                             if k in kwargs})
