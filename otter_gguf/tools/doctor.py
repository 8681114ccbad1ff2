"""``otter-gguf doctor``: what is installed, whether it fits together, and what to do.

:func:`diagnose` collects the versions (otter-gguf, llama-cpp-python, gguf,
numpy, torch), the patch series of the package and of the runtime, the ggml
backends and CPU features compiled into the runtime (against this CPU's), the
cache and its size, and a list of :class:`Problem` (what is wrong, what to do).
The runtime is probed in a child process, so a library that crashes on load
(an illegal instruction: a wheel built for another CPU) is a finding, not a crash.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from otter_gguf.runtime import build as rb

PACKAGES = ["otter-gguf", "llama-cpp-python", "gguf", "numpy", "torch"]

# run in a child: the runtime library, its series, ggml's backends/devices and the compiled-in CPU features
_PROBE = r"""
import ctypes, json
import llama_cpp.llama_cpp as m
lib = m._lib
def fn(name, res, *args):
    f = getattr(lib, name, None)
    if f is not None:
        f.restype, f.argtypes = res, list(args)
    return f
out = {"library": getattr(lib, "_name", "?")}
series = fn("llama_otter_series", ctypes.c_char_p)
out["series"] = series().decode() if series else None
m.llama_backend_init()
info = fn("llama_print_system_info", ctypes.c_char_p)
out["system_info"] = info().decode() if info else ""
from otter_gguf.runtime import backends
out["backends"] = backends.backend_names()
out["devices"] = [f"{d.name} ({d.description}, {d.type}, {d.memory_total // 2**20} MiB)" for d in backends.devices()]
try:
    out["rpc_server"] = str(backends.rpc_server_binary())
except FileNotFoundError:
    out["rpc_server"] = None
print(json.dumps(out))
"""

# llama.cpp's system-info feature -> the /proc/cpuinfo flag the CPU needs for it
CPU_FEATURE_FLAGS = {
    "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2", "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}


@dataclass
class Problem:
    what: str
    fix: str


@dataclass
class Report:
    versions: dict[str, str | None]
    python: str
    package_series: str | None
    patches: str
    runtime: dict | None  # the probe's result, None when llama_cpp is not importable
    runtime_error: str | None
    cpu_features: list[str]  # compiled into the runtime
    cache: Path
    cache_bytes: int
    stamp: dict | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _probe_runtime(python: str) -> tuple[dict | None, str | None]:
    res = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True)
    if res.returncode == 0:
        try:
            return json.loads(res.stdout.strip().splitlines()[-1]), None
        except (ValueError, IndexError):
            return None, f"the runtime probe printed no result: {res.stdout[-500:]}"
    if res.returncode < 0:
        sig = signal.Signals(-res.returncode).name
        return None, f"loading the runtime killed the process ({sig})"
    last = (res.stderr.strip().splitlines() or ["?"])[-1]
    return None, last


def compiled_cpu_features(system_info: str) -> list[str]:
    """``AVX = 1 | AVX2 = 1 | ...`` of llama_print_system_info -> the features that are on."""
    out = []
    for part in system_info.replace(":", "|").split("|"):
        name, _, value = part.partition("=")
        if value.strip() == "1":
            out.append(name.strip())
    return out


def diagnose(python: str | None = None) -> Report:
    """Everything ``otter-gguf doctor`` prints, and the problems found."""
    python = python or sys.executable
    versions = {d: _version(d) for d in PACKAGES}
    problems: list[Problem] = []
    try:
        package_series = rb.SERIES_PREFIX + rb.series_id()
        patches = str(rb.patches_dir())
    except rb.RuntimeBuildError as e:
        package_series, patches = None, str(e)
        problems.append(Problem(f"this otter-gguf has no patch series: {e}",
                                "reinstall otter-gguf (pip install --force-reinstall otter-gguf), "
                                "or set OTTER_GGUF_PATCHES to a checkout's patches/"))
    runtime, runtime_error = (None, None)
    if versions["llama-cpp-python"] is None:
        runtime_error = "llama-cpp-python is not installed"
        problems.append(Problem("llama-cpp-python (the runtime) is not installed",
                                "run `otter-gguf build-runtime` (builds the patched runtime, or installs it "
                                "from the cache), or pip install a wheel built with `build-runtime --wheel-out`"))
    else:
        runtime, runtime_error = _probe_runtime(python)
        if runtime is None:
            if "SIGILL" in (runtime_error or ""):
                fix = ("the runtime was built for another CPU: run `otter-gguf build-runtime --force` here, "
                       "or install a wheel built with `build-runtime --portable`")
            else:
                fix = "run `otter-gguf build-runtime --force` to rebuild and reinstall the runtime"
            problems.append(Problem(f"the runtime does not load: {runtime_error}", fix))
    features: list[str] = []
    if runtime is not None:
        features = compiled_cpu_features(runtime.get("system_info", ""))
        got = runtime.get("series")
        if got is None:
            problems.append(Problem(f"{runtime['library']} is a plain llama.cpp without the Otter API",
                                    "run `otter-gguf build-runtime` (replaces it with the patched runtime)"))
        elif got != package_series and not got.endswith("/dev"):
            problems.append(Problem(f"the runtime carries the patch series {got}, this otter-gguf "
                                    f"{package_series}",
                                    "run `otter-gguf build-runtime` (after an upgrade of otter-gguf the "
                                    "runtime must be rebuilt)"))
        cpu = rb._cpu_flags()
        if cpu:
            missing = [f for f in features if f in CPU_FEATURE_FLAGS and CPU_FEATURE_FLAGS[f] not in cpu]
            if missing:
                problems.append(Problem(
                    f"the runtime uses CPU features this CPU lacks: {', '.join(missing)} "
                    "(it may crash with an illegal instruction)",
                    "run `otter-gguf build-runtime --force` on this machine, or install a "
                    "`build-runtime --portable` wheel"))
    stamp = None
    try:
        stamp = json.loads(rb._stamp_path().read_text())
    except (OSError, ValueError):
        pass
    cache = rb.cache_dir()
    return Report(versions=versions, python=f"{platform.python_version()} ({python})",
                  package_series=package_series, patches=patches, runtime=runtime, runtime_error=runtime_error,
                  cpu_features=features, cache=cache, cache_bytes=_size(cache), stamp=stamp, problems=problems)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_report(r: Report) -> str:
    lines = ["versions:"]
    for d, v in r.versions.items():
        lines.append(f"  {d:17} {v or ('not installed (optional: reference, train)' if d == 'torch' else 'not installed')}")
    lines.append(f"  {'python':17} {r.python}")
    lines.append("runtime:")
    lines.append(f"  {'package series':17} {r.package_series or '-'} ({r.patches})")
    if r.runtime is not None:
        lines.append(f"  {'runtime series':17} {r.runtime.get('series') or 'none (not patched)'}")
        lines.append(f"  {'library':17} {r.runtime['library']}")
        lines.append(f"  {'ggml backends':17} {', '.join(r.runtime.get('backends') or []) or '-'}")
        lines.append(f"  {'devices':17} {', '.join(r.runtime.get('devices') or []) or '-'}")
        lines.append(f"  {'rpc-server':17} {r.runtime.get('rpc_server') or '- (build with --backend rpc)'}")
        lines.append(f"  {'CPU features':17} {' '.join(r.cpu_features) or '-'}")
    else:
        lines.append(f"  {'runtime series':17} - ({r.runtime_error})")
    if r.stamp:
        kind = "portable (x86-64-v3)" if r.stamp.get("portable") else "this machine's ISA"
        if r.stamp.get("backends"):
            kind += ", --backend " + ",".join(r.stamp["backends"])
        lines.append(f"  {'installed wheel':17} {r.stamp.get('wheel')} ({kind}, build key {r.stamp.get('key')})")
    lines.append("cache:")
    lines.append(f"  {'location':17} {r.cache}")
    wheels = len(list(r.cache.glob("wheels/*/*.whl"))) if r.cache.is_dir() else 0
    lines.append(f"  {'size':17} {_human(r.cache_bytes)} ({wheels} runtime wheel(s))")
    if r.ok:
        lines.append("no problems found")
    else:
        lines.append(f"{len(r.problems)} problem(s):")
        for p in r.problems:
            lines.append(f"  - {p.what}")
            lines.append(f"    fix: {p.fix}")
    return "\n".join(lines)
