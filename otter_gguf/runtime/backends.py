"""ggml backends and devices of the loaded runtime, and RPC servers (llama.cpp's ``--rpc``).

Typed ctypes bindings of the few ggml-backend functions llama.cpp's own tools use to list devices
(``--list-devices``) and to add RPC servers (``common/arg.cpp``: ``add_rpc_devices``), bound to the
library llama-cpp-python loaded (``llama_cpp.llama_cpp._lib``: ggml's symbols resolve through
libllama's dependencies, so these are the registries libllama itself uses), and a Pythonic layer
over them:

- :func:`devices` -- the devices the runtime sees (:class:`Device`: name, description, type,
  backend, memory), what ``otter-gguf doctor`` prints;
- :func:`parse_rpc_servers` -- ``"HOST:PORT,HOST:PORT"`` (or a list) checked, as ``--rpc`` takes it;
- :func:`rpc_model_devices` -- the device list a model with ``rpc_servers`` offloads to: the RPC
  servers' devices first, then the local GPUs, as llama.cpp orders them (``src/llama.cpp``,
  ``llama_prepare_model_devices``). The servers are not added to ggml's global registry, so other
  models of the process keep their own devices;
- :func:`rpc_server_binary` -- the ``ggml-rpc-server`` built beside the libraries;
  :class:`LocalRpcServers` -- some of them on 127.0.0.1 (tests, benchmarks);
- :func:`model_params` -- ``llama_model_params`` with those offload arguments (the C-API harness);
- :func:`unsupported_ops` -- graph nodes a device cannot compute (ggml's scheduler would move them);
- :func:`on_abort` -- a hook for ggml's abort (a lost RPC server ends the process).

An unreachable server is a :class:`ValueError` naming it: ggml's RPC client aborts the process when
it cannot connect (``ggml-rpc.cpp``: ``GGML_ABORT("Failed to connect to ...")``), so each endpoint
is reached over TCP first.
"""

from __future__ import annotations

import ctypes
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

__all__ = ["Device", "devices", "backend_names", "parse_rpc_servers", "rpc_model_devices",
           "rpc_server_binary", "on_abort", "model_params", "unsupported_ops", "check_reachable",
           "LocalRpcServers", "RPC_CONNECT_TIMEOUT_S"]

#: how long an RPC endpoint may take to accept a TCP connection before it counts as unreachable
RPC_CONNECT_TIMEOUT_S = 5.0

# enum ggml_backend_dev_type (ggml-backend.h)
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}

_c = ctypes
# name -> (argtypes, restype)
_SIGNATURES: Dict[str, Any] = {
    "ggml_backend_dev_count": ([], _c.c_size_t),
    "ggml_backend_dev_get": ([_c.c_size_t], _c.c_void_p),
    "ggml_backend_dev_name": ([_c.c_void_p], _c.c_char_p),
    "ggml_backend_dev_description": ([_c.c_void_p], _c.c_char_p),
    "ggml_backend_dev_type": ([_c.c_void_p], _c.c_int),
    "ggml_backend_dev_memory": ([_c.c_void_p, _c.POINTER(_c.c_size_t), _c.POINTER(_c.c_size_t)], None),
    "ggml_backend_dev_backend_reg": ([_c.c_void_p], _c.c_void_p),
    "ggml_backend_reg_name": ([_c.c_void_p], _c.c_char_p),
    "ggml_backend_reg_count": ([], _c.c_size_t),
    "ggml_backend_reg_get": ([_c.c_size_t], _c.c_void_p),
    "ggml_backend_reg_by_name": ([_c.c_char_p], _c.c_void_p),
    "ggml_backend_reg_dev_count": ([_c.c_void_p], _c.c_size_t),
    "ggml_backend_reg_dev_get": ([_c.c_void_p, _c.c_size_t], _c.c_void_p),
    "ggml_backend_reg_get_proc_address": ([_c.c_void_p, _c.c_char_p], _c.c_void_p),
    "ggml_set_abort_callback": ([_c.c_void_p], _c.c_void_p),
    "ggml_backend_dev_supports_op": ([_c.c_void_p, _c.c_void_p], _c.c_bool),
}
_bound: Dict[str, Any] = {}
# ggml_backend_reg_t (*)(const char * endpoint), from the RPC registry's proc address
_RPC_ADD_SERVER = _c.CFUNCTYPE(_c.c_void_p, _c.c_char_p)


# void (*ggml_abort_callback_t)(const char * error_message) (ggml.h)
_ABORT_CALLBACK = _c.CFUNCTYPE(None, _c.c_char_p)
_abort_hook: Any = None  # the installed callback, kept alive


def _fn(name: str) -> Any:
    f = _bound.get(name)
    if f is None:
        from llama_cpp import llama_cpp as _ll

        f = getattr(_ll._lib, name)
        f.argtypes, f.restype = _SIGNATURES[name]
        _bound[name] = f
    return f


def _text(p: bytes | None) -> str:
    return (p or b"").decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Device:
    """A ggml device: ``name`` (``CPU``, ``Vulkan0``, ``CUDA0``, ``RPC0``), ``description``,
    ``type`` (``cpu``/``gpu``/``igpu``/``accel``), ``backend`` (its registry: ``CPU``, ``RPC``, ...)
    and memory in bytes."""

    name: str
    description: str
    type: str
    backend: str
    memory_total: int
    memory_free: int


def _device(dev: int) -> Device:
    free, total = _c.c_size_t(0), _c.c_size_t(0)
    _fn("ggml_backend_dev_memory")(dev, _c.byref(free), _c.byref(total))
    reg = _fn("ggml_backend_dev_backend_reg")(dev)
    return Device(name=_text(_fn("ggml_backend_dev_name")(dev)),
                  description=_text(_fn("ggml_backend_dev_description")(dev)),
                  type=_DEV_TYPES.get(int(_fn("ggml_backend_dev_type")(dev)), "unknown"),
                  backend=_text(_fn("ggml_backend_reg_name")(reg)) if reg else "",
                  memory_total=int(total.value), memory_free=int(free.value))


def _device_ptrs() -> List[int]:
    return [_fn("ggml_backend_dev_get")(i) for i in range(int(_fn("ggml_backend_dev_count")()))]


def devices() -> List[Device]:
    """The devices registered in the runtime (llama.cpp's ``--list-devices`` plus the CPU)."""
    return [_device(d) for d in _device_ptrs()]


def unsupported_ops(device: str, nodes: Sequence[int]) -> List[int]:
    """The graph nodes (``ggml_tensor *``, e.g. from an eval callback) that the device named
    ``device`` cannot compute (``ggml_backend_dev_supports_op``): ggml's scheduler would run those
    on another backend (the CPU)."""
    dev = next((d for d in _device_ptrs() if _text(_fn("ggml_backend_dev_name")(d)) == device), None)
    if dev is None:
        raise ValueError(f"no device named {device!r}; the runtime has {[d.name for d in devices()]}")
    return [t for t in nodes if not _fn("ggml_backend_dev_supports_op")(dev, t)]


def backend_names() -> List[str]:
    """The backends (ggml registries) built into the runtime: ``CPU``, ``RPC``, ``Vulkan``, ..."""
    return [_text(_fn("ggml_backend_reg_name")(_fn("ggml_backend_reg_get")(i)))
            for i in range(int(_fn("ggml_backend_reg_count")()))]


def parse_rpc_servers(spec: Union[str, Sequence[str], None]) -> List[str]:
    """``"HOST:PORT,HOST:PORT"`` or a list of ``HOST:PORT`` -> the endpoints, checked
    (ValueError naming the bad one); None or empty -> []."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"rpc_servers: expected HOST:PORT strings, got {item!r}")
        ep = item.strip()
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rpc_servers: {ep!r} is not HOST:PORT (a port in 1..65535), "
                             "e.g. 127.0.0.1:50052")
        if ep in out:
            raise ValueError(f"rpc_servers: {ep} is given twice")
        out.append(ep)
    if isinstance(spec, str) and spec.strip() and not out:
        raise ValueError("rpc_servers: no HOST:PORT given")
    return out


def check_reachable(endpoint: str) -> None:
    """ValueError naming ``endpoint`` when nothing accepts a TCP connection there (the connection
    is closed at once: the server takes the next client)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RPC_CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ValueError(f"rpc_servers: cannot reach the RPC server {endpoint}: {e.strerror or e} "
                         "(start one there with `otter-gguf rpc-server --host HOST --port PORT`)") from None


def _rpc_devices(endpoint: str) -> List[int]:
    reg = _fn("ggml_backend_reg_by_name")(b"RPC")
    if not reg:
        raise ValueError("rpc_servers: this runtime has no RPC backend "
                         "(rebuild it with `otter-gguf build-runtime --backend cpu,rpc`)")
    addr = _fn("ggml_backend_reg_get_proc_address")(reg, b"ggml_backend_rpc_add_server")
    if not addr:
        raise ValueError("rpc_servers: the RPC backend has no ggml_backend_rpc_add_server")
    check_reachable(endpoint)
    server = _RPC_ADD_SERVER(addr)(endpoint.encode())
    if not server:
        raise ValueError(f"rpc_servers: the RPC server {endpoint} offers no device")
    return [_fn("ggml_backend_reg_dev_get")(server, i) for i in range(int(_fn("ggml_backend_reg_dev_count")(server)))]


def rpc_model_devices(rpc_servers: Union[str, Sequence[str]]) -> List[int]:
    """The devices (``ggml_backend_dev_t``) a model with ``rpc_servers`` offloads to, in llama.cpp's
    order: each server's devices, then the local GPUs (the integrated ones only when there is no
    discrete GPU). The servers are reached first: ValueError naming one that is not reachable."""
    endpoints = parse_rpc_servers(rpc_servers)
    rpc = [d for ep in endpoints for d in _rpc_devices(ep)]
    gpus, igpus = [], []
    for d in _device_ptrs():
        info = _device(d)
        if info.backend == "RPC":
            continue  # a server added to the global registry by other code: not ours to use
        if info.type == "gpu":
            gpus.append(d)
        elif info.type == "igpu":
            igpus.append(d)
    return rpc + gpus + (igpus if not gpus else [])


def model_params(*, n_gpu_layers: int = 0, split_mode: int = 1, main_gpu: int = 0,
                 tensor_split: Sequence[float] | None = None,
                 rpc_servers: Union[str, Sequence[str], None] = None) -> Any:
    """``llama_model_params`` (llama.cpp's defaults) with ``OtterLlama``'s offload arguments, for the
    C-API harness (runtime.session.Model): ``n_gpu_layers`` (-1: every layer, as in llama-cpp-python),
    ``split_mode``, ``main_gpu``, ``tensor_split``, ``rpc_servers``. The arrays it points to are kept
    on the returned object."""
    from llama_cpp import llama_cpp as _ll

    mp = _ll.llama_model_default_params()
    mp.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else int(n_gpu_layers)
    mp.split_mode = int(split_mode)
    mp.main_gpu = int(main_gpu)
    keep: List[Any] = []
    if tensor_split:
        n = int(_ll.llama_max_devices())
        if len(tensor_split) > n:
            raise ValueError(f"tensor_split has {len(tensor_split)} proportions; this runtime splits over at most {n} devices")
        ts = (_c.c_float * n)(*tensor_split)
        mp.tensor_split = ts
        keep.append(ts)
    if rpc_servers:
        devs = rpc_model_devices(rpc_servers)
        arr = (_c.c_void_p * (len(devs) + 1))(*devs, None)
        mp.devices = _c.cast(arr, _c.c_void_p)
        keep.append(arr)
    mp._otter_keep = keep  # type: ignore[attr-defined]
    return mp


def rpc_server_binary() -> Path:
    """The ``ggml-rpc-server`` of the loaded runtime (beside its libraries); FileNotFoundError
    when this runtime was built without it."""
    from llama_cpp import llama_cpp as _ll

    lib = Path(_ll._lib._name).resolve().parent
    exe = lib / "ggml-rpc-server"
    if not exe.is_file():
        raise FileNotFoundError(f"{exe}: this runtime has no RPC server "
                                "(rebuild it with `otter-gguf build-runtime --backend cpu,rpc`)")
    return exe


def on_abort(hook: Any) -> None:
    """Call ``hook(message)`` when ggml aborts the process (``GGML_ABORT``: a lost RPC server,
    ``Remote RPC server crashed or returned malformed response``, or any other fatal error), on the
    thread that aborts, before ggml prints the message and calls ``abort()``: the process ends when
    the hook returns, so a hook only reports (a server fails its requests with the message). None
    restores ggml's default (print the message and a backtrace)."""
    global _abort_hook

    def call(message: bytes | None) -> None:
        text = _text(message)
        print(text, file=sys.stderr, flush=True)  # what ggml prints without a callback
        try:
            hook(text)
        except BaseException:  # noqa: BLE001 - the process aborts next either way
            pass

    cb = _ABORT_CALLBACK(call) if hook is not None else None
    _fn("ggml_set_abort_callback")(_c.cast(cb, _c.c_void_p) if cb is not None else None)
    _abort_hook = cb


class LocalRpcServers:
    """``n`` RPC servers of this runtime on 127.0.0.1, each on a free port and with ``threads``
    CPU threads, for tests and benchmarks (``with LocalRpcServers(2) as s: s.spec``). A server
    serves one client process at a time (ggml-rpc.cpp accepts the next connection when the
    current one closes). :meth:`kill` ends one abruptly (a lost server)."""

    def __init__(self, n: int = 2, threads: int = 1, start_timeout_s: float = 30.0):
        self.n, self.threads, self.start_timeout_s = n, threads, start_timeout_s
        self.procs: List[Any] = []
        self.endpoints: List[str] = []

    @property
    def spec(self) -> str:
        """``HOST:PORT,HOST:PORT`` (``--rpc`` / ``rpc_servers``)."""
        return ",".join(self.endpoints)

    def __enter__(self) -> "LocalRpcServers":
        import subprocess
        import time

        exe = rpc_server_binary()
        try:
            for _ in range(self.n):
                port = _fresh_port()
                proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", str(self.threads)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self.procs.append(proc)
                self.endpoints.append(f"127.0.0.1:{port}")
            deadline = time.monotonic() + self.start_timeout_s
            for ep, proc in zip(self.endpoints, self.procs):
                while not _listening(ep):
                    if proc.poll() is not None:
                        raise RuntimeError(f"the RPC server for {ep} exited ({proc.returncode}): "
                                           f"{proc.stderr.read().decode(errors='replace')[-500:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the RPC server for {ep} did not listen within {self.start_timeout_s} s")
                    time.sleep(0.05)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


#: ports LocalRpcServers used in this process: ggml's RPC client keeps one connection per endpoint for the
#: life of the process (ggml_backend_rpc_add_server caches it), so an endpoint is never reused for a new server
_USED_PORTS: set = set()


def _fresh_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _USED_PORTS:
            _USED_PORTS.add(port)
            return port


def _listening(endpoint: str) -> bool:
    """Whether something listens on ``endpoint``, asked without connecting (a connection would
    be taken as the server's one client until closed): the kernel's table of listening sockets."""
    host, _, port = endpoint.rpartition(":")
    want = f"{int(port):04X}"
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:  # not Linux: connect (and close at once)
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            return False
    return any(r.split()[1].endswith(":" + want) and r.split()[3] == "0A" for r in rows)
