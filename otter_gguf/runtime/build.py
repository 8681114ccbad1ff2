"""Build the patched llama.cpp runtime: llama-cpp-python with patches/ applied.

The pinned llama-cpp-python sdist vendors the llama.cpp source our patch
series applies to. `build_runtime()` downloads it with pip (cached), applies
`patches/*.patch` in order to `vendor/llama.cpp`, builds a wheel (cached, keyed
by everything that changes its bytes) and installs it into the running
interpreter's environment.

The series comes from the installed package (``otter_gguf/_patches``: wheels
and sdists carry the top-level ``patches/`` there), else from the checkout
this module runs from, else from ``$OTTER_GGUF_PATCHES`` when set (first).
The compile shows a progress bar over CMake/Ninja's ``[n/N]`` steps and keeps
the full log in ``<cache>/logs/``; a failure names the relevant lines and the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# the pinned source and the cache live with the converter's llama.cpp helper (the converter uses them too)
from otter_gguf.io.cache import cache_dir
from otter_gguf.io.llama_source import LLAMA_CPP_PYTHON_VERSION, SDIST_NAME, LlamaCppSourceError, extract_sdist, fetch_sdist, pinned_llama_cpp_source

SERIES_PREFIX = "otter-gguf/"

# Build only the shared libraries llama-cpp-python loads.
_BASE_CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
]

# llama-cpp-python's CMakeLists.txt forces llama.cpp's common library on (LLAMA_BUILD_COMMON ... FORCE,
# so no -D option turns it off), but the Python package never loads libllama-common: its ~50 compile
# steps (chat parsers, argument parser, downloader) are skipped by turning that line off in the
# extracted sdist before the build. Part of the cache key.
_SDIST_COMMON_LINE = 'set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'
# llama.cpp builds its RPC server (tools/rpc, links ggml only) with the other tools, which need the common
# library; the sdist edit adds that one directory after llama.cpp's and installs the server beside the
# libraries (llama_cpp/lib/ggml-rpc-server), when GGML_RPC is on.
_SDIST_ANCHOR_LINE = "add_subdirectory(vendor/llama.cpp)\n"
_SDIST_RPC_SERVER = """
# otter-gguf: the RPC backend's server, built from the same patched source, beside the libraries
if (GGML_RPC)
    add_subdirectory(vendor/llama.cpp/tools/rpc ${CMAKE_BINARY_DIR}/otter-gguf-rpc-server)
    llama_cpp_python_install_target(ggml-rpc-server)
endif()
"""
_SDIST_EDITS = ("llama-common off", "rpc-server installed")

# ggml-vulkan.cpp creates its instance with vk::LayerSettingEXT (VK_EXT_layer_settings, Vulkan headers
# 1.3.261+); Debian 12's vulkan.hpp is 1.3.239. With --backend vulkan that block is compiled only where
# the headers declare the extension (the layer settings only tune the validation layer).
_VULKAN_SOURCE = Path("vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp")
_VULKAN_EDITS = ("layer settings guarded by VK_EXT_layer_settings",)

#: ``--backend`` names -> the CMake options that turn them on (the CPU backend is always built)
BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "rpc": ("-DGGML_RPC=ON",),
    "vulkan": ("-DGGML_VULKAN=ON",),
    "cuda": ("-DGGML_CUDA=ON",),
    "metal": ("-DGGML_METAL=ON",),
}
#: what ``build-runtime`` builds without ``--backend``: the CPU backend and the RPC client and server
#: (a small one-file backend, so a model splits over machines and ``make test`` checks that)
DEFAULT_BACKENDS = ("cpu", "rpc")

# x86 flags we map from /proc/cpuinfo to ggml's CMake options. AMX is never
# enabled: with AMX, K-quant prompt processing segfaults (llama.cpp #20824).
_X86_FLAG_OPTIONS = [
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
]
_NO_AMX = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


class RuntimeBuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


class RuntimeBuildInputError(RuntimeBuildError):
    """The input or environment is wrong (a patch that does not apply, no
    compiler or cmake, an existing --dev-source directory): exit code 2."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def packaged_patches_dir() -> Path:
    """Where an installed wheel or sdist keeps the series (package data ``otter_gguf._patches``)."""
    return Path(__file__).resolve().parents[1] / "_patches"


def patches_dir() -> Path:
    """The patch series this package builds: ``$OTTER_GGUF_PATCHES``, else the
    installed package's copy, else the checkout's ``patches/``."""
    env = os.environ.get("OTTER_GGUF_PATCHES")
    if env:
        return Path(env)
    packaged = packaged_patches_dir()
    if packaged.is_dir():
        return packaged
    return project_root() / "patches"


def patch_series(directory: Path | None = None) -> list[Path]:
    directory = directory or patches_dir()
    if not directory.is_dir():
        raise RuntimeBuildInputError(
            f"patch directory not found: {directory} (this otter-gguf install carries no patch series: "
            "reinstall it from a wheel or sdist, or set OTTER_GGUF_PATCHES to a patches/ folder)")
    found = sorted(directory.glob("*.patch"))
    if not found:
        raise RuntimeBuildInputError(f"no *.patch file in {directory}")
    return found


def series_id(patches: list[Path] | None = None) -> str:
    """Short hash over the names and bytes of the patch series, in order."""
    h = hashlib.sha256()
    for p in patches if patches is not None else patch_series():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"otter-gguf: {msg}", file=sys.stderr, flush=True)


# -- source ---------------------------------------------------------------


@contextlib.contextmanager
def _source_errors():
    """The pinned source's errors (download, extraction) as build errors."""
    try:
        yield
    except LlamaCppSourceError as e:
        raise RuntimeBuildError(str(e)) from None


_HUNK_RE = re.compile(r"error: patch failed: (\S+):(\d+)")


def apply_series(llama_dir: Path, patches: list[Path]) -> None:
    """Apply patches in order with `git apply`; name the patch and hunk on failure."""
    if shutil.which("git") is None:
        raise RuntimeBuildInputError("git not found: it is needed to apply patches/ (apt-get install git)")
    for p in patches:
        res = subprocess.run(["git", "apply", "--whitespace=nowarn", "-v", str(p.resolve())],
                             cwd=llama_dir, capture_output=True, text=True)
        if res.returncode != 0:
            hunks = [f"{f} (hunk at line {ln})" for f, ln in _HUNK_RE.findall(res.stderr)]
            where = "; ".join(hunks) if hunks else res.stderr.strip().splitlines()[-1:]
            raise RuntimeBuildInputError(
                f"patch {p.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s "
                f"vendor/llama.cpp: {where}\n{res.stderr.strip()}")


# -- build configuration ----------------------------------------------------


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: --portable on x86-64: the x86-64-v3 baseline (Haswell, 2013; Zen 1, 2017): AVX2, FMA, F16C, BMI2;
#: nothing newer (AVX-VNNI, AVX-512). ggml's runtime CPU dispatch (GGML_BACKEND_DL +
#: GGML_CPU_ALL_VARIANTS) is not used: libllama looks for the ggml-cpu-* variants next to the
#: executable (python) or in the working directory, and llama-cpp-python 0.3.36 installs none of them.
PORTABLE_X86_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "bmi2"})


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def backend_cmake_args(backends: tuple[str, ...] | list[str]) -> list[str]:
    """The CMake options of ``backends`` (names of :data:`BACKENDS`), in a fixed order."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise RuntimeBuildInputError(f"unknown backend {', '.join(map(repr, unknown))}: expected one or more of "
                                     f"{', '.join(BACKENDS)}")
    return [opt for name, opts in BACKENDS.items() if name in backends for opt in opts]


def normalize_backends(backends: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``backends`` (None: :data:`DEFAULT_BACKENDS`) in :data:`BACKENDS` order, the CPU always in."""
    chosen = set(DEFAULT_BACKENDS if not backends else backends) | {"cpu"}
    backend_cmake_args(tuple(chosen))  # names checked
    return tuple(name for name in BACKENDS if name in chosen)


def default_cmake_args(portable: bool = False) -> list[str]:
    """Flags that are safe on this machine (``portable``: on any x86-64-v3
    machine): explicit ISA options, ``GGML_NATIVE=OFF``, never AMX."""
    args = list(_BASE_CMAKE_ARGS)
    if portable:
        args.append("-DGGML_NATIVE=OFF")
        if _is_x86_64():
            for flag, opt in _X86_FLAG_OPTIONS:
                args.append(f"-D{opt}={'ON' if flag in PORTABLE_X86_FLAGS else 'OFF'}")
            args += _NO_AMX
        return args
    if _is_x86_64() and sys.platform.startswith("linux"):
        flags = _cpu_flags()
        args.append("-DGGML_NATIVE=OFF")
        for flag, opt in _X86_FLAG_OPTIONS:
            args.append(f"-D{opt}={'ON' if flag in flags else 'OFF'}")
        args += _NO_AMX
    elif _is_x86_64():
        args.append("-DGGML_NATIVE=OFF")
        args += _NO_AMX
    return args


@dataclass(frozen=True)
class BuildPlan:
    series: str
    cmake_args: list[str]
    key: str
    portable: bool = False
    backends: tuple[str, ...] = DEFAULT_BACKENDS

    @property
    def marker(self) -> str:
        return SERIES_PREFIX + self.series


def plan_build(user_cmake_args: str | None = None, portable: bool = False,
               backends: tuple[str, ...] | list[str] | None = None) -> BuildPlan:
    """The build for this machine (``portable``: for any x86-64-v3 machine) with
    ``backends`` (default :data:`DEFAULT_BACKENDS`).

    On a CPU whose flags are exactly the x86-64-v3 set the native options are the
    portable ones: the two plans are one (same key, ``portable`` true), so one
    cached wheel serves both and ``--wheel-out`` writes that wheel either way."""
    series = series_id()
    backends = normalize_backends(backends)
    user = user_cmake_args if user_cmake_args is not None else os.environ.get("CMAKE_ARGS", "")
    ours = default_cmake_args(portable)
    portable = portable or (_is_x86_64() and ours == default_cmake_args(portable=True))
    # ours first: a user's -D option given later overrides ours in CMake
    args = ours + backend_cmake_args(backends) + user.split() + [f"-DLLAMA_OTTER_SERIES={series}"]
    ident = {
        "llama-cpp-python": LLAMA_CPP_PYTHON_VERSION,
        "series": series,
        "cmake_args": args,
        "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "machine": f"{sys.platform}-{platform.machine()}",
        "sdist_edits": list(_SDIST_EDITS) + (list(_VULKAN_EDITS) if "vulkan" in backends else []),
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return BuildPlan(series=series, cmake_args=args, key=key, portable=portable, backends=backends)


# -- build / install ----------------------------------------------------------


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise RuntimeBuildInputError(f"{path} has no single {old.strip()!r}: this is not the "
                                     f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist the build expects")
    path.write_text(text.replace(old, new))


# the instance-creation lines of ggml-vulkan.cpp that use vk::LayerSettingEXT (see _VULKAN_EDITS)
_VULKAN_LAYER_SETTINGS_START = "    std::vector<vk::LayerSettingEXT> settings = {"
_VULKAN_INSTANCE_INFO = ("    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, "
                         "extensions, &layer_setting_info);\n")
_VULKAN_INSTANCE_INFO_PLAIN = ("    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, "
                               "extensions);\n")


def edit_sdist(sdist_root: Path, backends: tuple[str, ...] = DEFAULT_BACKENDS) -> None:
    """Build only what llama-cpp-python loads, plus the RPC server (:data:`_SDIST_EDITS`);
    with the Vulkan backend, guard its use of newer Vulkan headers (:data:`_VULKAN_EDITS`)."""
    cmake = sdist_root / "CMakeLists.txt"
    _edit(cmake, _SDIST_COMMON_LINE, _SDIST_COMMON_LINE.replace(" ON ", " OFF "))
    _edit(cmake, _SDIST_ANCHOR_LINE, _SDIST_ANCHOR_LINE + _SDIST_RPC_SERVER)
    if "vulkan" in backends:
        vk = sdist_root / _VULKAN_SOURCE
        text = vk.read_text()
        start = text.find(_VULKAN_LAYER_SETTINGS_START)
        end = text.find(_VULKAN_INSTANCE_INFO, start)
        if start < 0 or end < 0:
            raise RuntimeBuildInputError(f"{vk} has no vk::LayerSettingEXT block: this is not the "
                                         f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist the build expects")
        end += len(_VULKAN_INSTANCE_INFO)
        vk.write_text(text[:start] + "#if defined(VK_EXT_layer_settings)\n" + text[start:end] + "#else\n"
                      + "    (void) enable_best_practice;\n" + _VULKAN_INSTANCE_INFO_PLAIN + "#endif\n" + text[end:])


def _check_toolchain() -> None:
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise RuntimeBuildInputError("no C++ compiler found (c++, g++ or clang++): install one "
                                "(Debian: apt-get install build-essential; macOS: xcode-select --install)")
    if shutil.which("cmake") is None:
        raise RuntimeBuildInputError("cmake not found: install cmake >= 3.21 "
                                "(Debian: apt-get install cmake, or pip install cmake)")


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# what the build prints -> (the phase it starts, shown as one line)
_PHASES = [
    (re.compile(r"Installing build dependencies|Getting requirements to build"), "preparing the build"),
    (re.compile(r"\*\*\* Configuring CMake"), "configuring (CMake)"),
    (re.compile(r"\*\*\* Building project"), "compiling"),
    (re.compile(r"\*\*\* Installing project into wheel"), "packing the wheel"),
]
_STEP_RE = re.compile(r"^\s*\[(\d+)/(\d+)\]\s*(.*)")  # Ninja: [12/141] Building CXX object .../llama.cpp.o
_PERCENT_RE = re.compile(r"^\s*\[\s*(\d+)%\]\s*(.*)")  # Make: [ 45%] Building CXX object ...
# what a step makes: a verbose Ninja line is the command (`-c SRC`, or a link's `-o LIB`),
# a terse one names the object ("Building CXX object DIR/x.cpp.o", "Linking CXX shared library bin/x.so")
_OBJECT_RE = re.compile(r"\s-c\s+(\S+)|\s-o\s+(\S+\.(?:so|dylib|dll)\S*)|(?:object|library)\s+(\S+)")
# pip's own lines around a failed build: not worth showing
_PIP_NOISE_RE = re.compile(r"\s*(note: This error originates|full command: |\[exit status|cwd: |"
                           r"Building wheel for \S+ \(pyproject.toml\): finished with status|\s*$)")
# lines that say why a build failed, kept for the failure message
_RELEVANT_RE = re.compile(r"error|CMake Error|FAILED|fatal|undefined reference|not found|No such file",
                          re.IGNORECASE)


class BuildProgress:
    """Shows a build's output as phases and a tqdm bar over the compile steps.

    ``feed(line)`` takes each line of the build's output. On a terminal the bar
    redraws in place; elsewhere (a pipe, CI) a plain line is printed at every
    tenth of the steps. ``close()`` ends the bar.
    """

    def __init__(self, stream=None, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.monotonic()
        self.phase: str | None = None
        self.bar = None
        self.done = self.total = 0
        self._shown_tenth = -1

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(f"otter-gguf: {msg}", file=self.stream)
        else:
            print(f"otter-gguf: {msg}", file=self.stream, flush=True)

    def _enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.say(f"{phase} ... ({_elapsed(time.monotonic() - self.start)})")

    def feed(self, line: str) -> None:
        for pattern, phase in _PHASES:
            if pattern.search(line):
                self._enter(phase)
                return
        m = _STEP_RE.match(line)
        if m:
            self._step(int(m.group(1)), int(m.group(2)), m.group(3))
            return
        m = _PERCENT_RE.match(line)
        if m:
            self._step(int(m.group(1)), 100, m.group(2))

    def _step(self, n: int, total: int, what: str) -> None:
        self._enter("compiling")
        obj = _OBJECT_RE.search(what)
        made = next((g for g in obj.groups() if g), None) if obj else None
        name = Path(made).name.removesuffix(".o") if made else what.strip()[-40:]
        self.done, self.total = n, total
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=self.stream, unit="step", desc="otter-gguf: compiling",
                                bar_format="{desc} [{n_fmt}/{total_fmt}] {bar} {elapsed} {postfix}",
                                dynamic_ncols=True, leave=True)
            self.bar.total = total
            self.bar.n = n
            self.bar.set_postfix_str(name[:40], refresh=False)
            self.bar.refresh()
            return
        tenth = n * 10 // max(total, 1)
        if tenth > self._shown_tenth or n == total:
            self._shown_tenth = tenth
            print(f"otter-gguf:   [{n}/{total}] {name} ({_elapsed(time.monotonic() - self.start)})",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def relevant_lines(lines: list[str], limit: int = 25) -> list[str]:
    """The lines of a failed build's log worth showing: the last error-like
    lines with one line of context after each, else the last lines."""
    lines = [ln for ln in lines if not _PIP_NOISE_RE.match(ln)]
    keep: list[int] = []
    for i, line in enumerate(lines):
        if _RELEVANT_RE.search(line) and "-Werror" not in line and "error_" not in line.lower():
            keep += [i, i + 1]
    picked = sorted({i for i in keep if i < len(lines)})
    if not picked:
        picked = list(range(max(0, len(lines) - limit), len(lines)))
    return [lines[i].rstrip() for i in picked[-limit:]]


def run_logged(cmd: list[str], env: dict[str, str] | None, log_path: Path,
               progress: BuildProgress | None = None) -> int:
    """Run cmd; its whole output goes to log_path (appended) and, line by line, to progress."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, errors="replace")
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if progress is not None:
                    progress.feed(line)
        finally:
            rc = proc.wait()
            if progress is not None:
                progress.close()
        log.write(f"[exit status {rc}]\n")
    return rc


def build_log_path(plan: BuildPlan) -> Path:
    """The build's full log: ``<cache>/logs/runtime-<key>.log`` (the last build of that plan)."""
    return cache_dir() / "logs" / f"runtime-{plan.key}.log"


def cached_wheel(plan: BuildPlan) -> Path | None:
    wheel_dir = cache_dir() / "wheels" / plan.key
    found = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.is_dir() else []
    return found[0] if found else None


def build_wheel(plan: BuildPlan, stream=None) -> Path:
    """Return the cached wheel for plan, building it if needed (progress on ``stream``, default stderr)."""
    found = cached_wheel(plan)
    if found:
        _log(f"using the cached runtime wheel {found}")
        return found
    _check_toolchain()
    patches = patch_series()
    progress = BuildProgress(stream)
    log_path = build_log_path(plan)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"otter-gguf runtime build {plan.marker}, llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}\n"
                        f"CMAKE_ARGS={' '.join(plan.cmake_args)}\n")
    with _source_errors():
        sdist = fetch_sdist()
    work_root = cache_dir() / "build"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix=f"{plan.key}-") as tmp:
        with _source_errors():
            src = extract_sdist(sdist, Path(tmp) / SDIST_NAME)
        progress.say(f"applying {len(patches)} patch(es) from {patches[0].parent}")
        apply_series(src / "vendor" / "llama.cpp", patches)
        edit_sdist(src, plan.backends)
        out = Path(tmp) / "dist"
        env = dict(os.environ)
        env["CMAKE_ARGS"] = " ".join(plan.cmake_args)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        progress.say(f"building the runtime wheel{' (portable: x86-64-v3)' if plan.portable else ''}, "
                     f"a few minutes; full log: {log_path}")
        _log(f"CMAKE_ARGS={env['CMAKE_ARGS']}")
        rc = run_logged([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps",
                         "--wheel-dir", str(out), str(src)], env, log_path, progress)
        wheels = sorted(out.glob("llama_cpp_python-*.whl"))
        took = _elapsed(time.monotonic() - progress.start)
        if rc != 0 or not wheels:
            shown = "\n".join("  " + ln for ln in relevant_lines(log_path.read_text(errors="replace").splitlines()))
            at = f" at step {progress.done}/{progress.total}" if progress.total else (
                f" while {progress.phase}" if progress.phase else "")
            raise RuntimeBuildError(f"runtime wheel build failed{at} after {took} (pip exit status {rc}):\n"
                                    f"{shown}\nfull log: {log_path}")
        wheel_dir = cache_dir() / "wheels" / plan.key
        wheel_dir.mkdir(parents=True, exist_ok=True)
        tmp_wheel = wheel_dir / (wheels[0].name + ".part")
        shutil.copy(wheels[0], tmp_wheel)
        final = wheel_dir / wheels[0].name
        os.replace(tmp_wheel, final)
        (wheel_dir / "build.json").write_text(json.dumps(
            {"series": plan.series, "cmake_args": plan.cmake_args, "portable": plan.portable,
             "backends": list(plan.backends)}, indent=1))
        progress.say(f"built {final.name} in {took}")
    return final


def _stamp_path() -> Path:
    return Path(sys.prefix) / "share" / "otter-gguf" / "runtime.json"


def installed_series() -> str | None:
    """The patch-series marker of the importable llama_cpp runtime, or None."""
    code = ("import llama_cpp.llama_cpp as m, ctypes\n"
            "f = getattr(m._lib, 'llama_otter_series', None)\n"
            "f is not None and setattr(f, 'restype', ctypes.c_char_p)\n"
            "print(f().decode() if f is not None else '')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def install_wheel(wheel: Path, plan: BuildPlan) -> None:
    _log(f"installing {wheel.name}")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps",
                          "-q", str(wheel)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeBuildError(f"pip install {wheel} failed:\n{res.stderr.strip()[-2000:]}")
    # llama-cpp-python's own runtime dependencies, if missing
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "numpy", "typing-extensions",
                    "diskcache", "jinja2"], capture_output=True, text=True)
    stamp = _stamp_path()
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": plan.key, "series": plan.series, "wheel": wheel.name,
                                 "portable": plan.portable, "backends": list(plan.backends)}))


def keep_wheel(wheel: Path, out_dir: Path) -> Path:
    """Copy the built wheel to out_dir (``--wheel-out``) and return its path there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / wheel.name
    shutil.copy(wheel, dest)
    _log(f"wheel kept: {dest} (install elsewhere with: pip install --force-reinstall --no-deps {dest.name})")
    return dest


def build_runtime(user_cmake_args: str | None = None, force: bool = False, portable: bool = False,
                  wheel_out: Path | None = None, install: bool = True,
                  backends: tuple[str, ...] | list[str] | None = None) -> BuildPlan:
    """Build (or take from the cache) the runtime wheel with ``backends`` (default
    :data:`DEFAULT_BACKENDS`); install it unless ``install`` is False; copy it to
    ``wheel_out`` when given."""
    plan = plan_build(user_cmake_args, portable=portable, backends=backends)
    stamp = _stamp_path()
    if install and wheel_out is None and not force and stamp.is_file():
        try:
            same = json.loads(stamp.read_text()).get("key") == plan.key
        except ValueError:
            same = False
        if same and installed_series() == plan.marker:
            _log(f"runtime up to date ({plan.marker})")
            return plan
    if force:
        stale = cached_wheel(plan)
        if stale is not None:
            shutil.rmtree(stale.parent)
    wheel = build_wheel(plan)
    if wheel_out is not None:
        keep_wheel(wheel, wheel_out)
    if not install:
        return plan
    install_wheel(wheel, plan)
    got = installed_series()
    if got != plan.marker:
        raise RuntimeBuildError(f"installed runtime reports {got!r}, expected {plan.marker!r}")
    _log(f"runtime installed ({plan.marker})")
    return plan


def make_dev_source(dest: Path) -> Path:
    """Pristine llama.cpp source with the series applied as git commits (for editing)."""
    if dest.exists():
        raise RuntimeBuildInputError(f"{dest} exists: remove it first (it may hold unexported commits)")
    patches = patch_series()
    with _source_errors():
        src = pinned_llama_cpp_source()
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git"))
    git = ["git", "-c", "user.name=otter-gguf", "-c", "user.email=dev@otter-gguf"]
    try:
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
        subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
        subprocess.run(git + ["commit", "-q", "-m", f"pristine llama.cpp from llama-cpp-python "
                              f"{LLAMA_CPP_PYTHON_VERSION}"], cwd=dest, check=True)
        subprocess.run(["git", "tag", "pristine"], cwd=dest, check=True)
        for p in patches:
            res = subprocess.run(git + ["am", "-q", "--3way", str(p.resolve())], cwd=dest,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeBuildInputError(
                    f"patch {p.name} does not apply as a commit (git am): {res.stderr.strip()}")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
