"""Build the patched llama.cpp runtime: llama-cpp-python with patches/ applied.

The pinned llama-cpp-python sdist vendors the llama.cpp source our patch
series applies to. `build_runtime()` downloads it with pip (cached), applies
`patches/*.patch` in order to `vendor/llama.cpp`, builds a wheel (cached, keyed
by everything that changes its bytes) and installs it into the running
interpreter's environment.
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
from dataclasses import dataclass
from pathlib import Path

# the pinned source and the cache live with the converter's llama.cpp helper (the converter uses them too)
from otter_gguf_converter.llamacpp import (LLAMA_CPP_PYTHON_VERSION, SDIST_NAME, LlamaCppSourceError, cache_dir,
                                           extract_sdist, fetch_sdist, pinned_llama_cpp_source)

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


def patches_dir() -> Path:
    env = os.environ.get("OTTER_GGUF_PATCHES")
    return Path(env) if env else project_root() / "patches"


def patch_series(directory: Path | None = None) -> list[Path]:
    directory = directory or patches_dir()
    if not directory.is_dir():
        raise RuntimeBuildInputError(f"patch directory not found: {directory}")
    return sorted(directory.glob("*.patch"))


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


def default_cmake_args() -> list[str]:
    """Flags that are safe on this machine: explicit ISA options, never AMX."""
    args = list(_BASE_CMAKE_ARGS)
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and sys.platform.startswith("linux"):
        flags = _cpu_flags()
        args.append("-DGGML_NATIVE=OFF")
        for flag, opt in _X86_FLAG_OPTIONS:
            args.append(f"-D{opt}={'ON' if flag in flags else 'OFF'}")
        args += _NO_AMX
    elif machine in ("x86_64", "amd64"):
        args.append("-DGGML_NATIVE=OFF")
        args += _NO_AMX
    return args


@dataclass(frozen=True)
class BuildPlan:
    series: str
    cmake_args: list[str]
    key: str

    @property
    def marker(self) -> str:
        return SERIES_PREFIX + self.series


def plan_build(user_cmake_args: str | None = None) -> BuildPlan:
    series = series_id()
    user = user_cmake_args if user_cmake_args is not None else os.environ.get("CMAKE_ARGS", "")
    # ours first: a user's -D option given later overrides ours in CMake
    args = default_cmake_args() + user.split() + [f"-DLLAMA_OTTER_SERIES={series}"]
    ident = {
        "llama-cpp-python": LLAMA_CPP_PYTHON_VERSION,
        "series": series,
        "cmake_args": args,
        "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "machine": f"{sys.platform}-{platform.machine()}",
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return BuildPlan(series=series, cmake_args=args, key=key)


# -- build / install ----------------------------------------------------------


def _check_toolchain() -> None:
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise RuntimeBuildInputError("no C++ compiler found (c++, g++ or clang++): install one "
                                "(Debian: apt-get install build-essential; macOS: xcode-select --install)")
    if shutil.which("cmake") is None:
        raise RuntimeBuildInputError("cmake not found: install cmake >= 3.21 "
                                "(Debian: apt-get install cmake, or pip install cmake)")


def _run_streaming(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run cmd, keep its full output in log_path, show compile progress lines."""
    step = re.compile(r"^\s*\[(\d+)/(\d+)\]")
    source = re.compile(r"\s-c\s+(\S+)")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = step.match(line)
            if m:
                src = source.search(line)
                what = Path(src.group(1)).name if src else line.split()[-1][-60:]
                print(f"  [{m.group(1)}/{m.group(2)}] {what}", file=sys.stderr, flush=True)
            elif re.search(r"\berror\b|Created wheel", line):
                print("  " + line.rstrip()[:200], file=sys.stderr, flush=True)
        return proc.wait()


def build_wheel(plan: BuildPlan) -> Path:
    """Return the cached wheel for plan, building it if needed."""
    wheel_dir = cache_dir() / "wheels" / plan.key
    found = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.is_dir() else []
    if found:
        return found[0]
    _check_toolchain()
    patches = patch_series()
    with _source_errors():
        sdist = fetch_sdist()
    work_root = cache_dir() / "build"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix=f"{plan.key}-") as tmp:
        with _source_errors():
            src = extract_sdist(sdist, Path(tmp) / SDIST_NAME)
        _log(f"applying {len(patches)} patch(es) from {patches_dir()}")
        apply_series(src / "vendor" / "llama.cpp", patches)
        out = Path(tmp) / "dist"
        env = dict(os.environ)
        env["CMAKE_ARGS"] = " ".join(plan.cmake_args)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        log_path = Path(tmp) / "build.log"
        _log(f"building the runtime wheel (a few minutes); CMAKE_ARGS={env['CMAKE_ARGS']}")
        rc = _run_streaming([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps",
                             "--wheel-dir", str(out), str(src)], env, log_path)
        wheels = sorted(out.glob("llama_cpp_python-*.whl"))
        if rc != 0 or not wheels:
            kept = cache_dir() / "last-build.log"
            shutil.copy(log_path, kept)
            tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-40:])
            raise RuntimeBuildError(f"runtime wheel build failed (full log: {kept}):\n{tail}")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        tmp_wheel = wheel_dir / (wheels[0].name + ".part")
        shutil.copy(wheels[0], tmp_wheel)
        final = wheel_dir / wheels[0].name
        os.replace(tmp_wheel, final)
        (wheel_dir / "build.json").write_text(json.dumps(
            {"series": plan.series, "cmake_args": plan.cmake_args}, indent=1))
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
    stamp.write_text(json.dumps({"key": plan.key, "series": plan.series, "wheel": wheel.name}))


def build_runtime(user_cmake_args: str | None = None, force: bool = False) -> BuildPlan:
    plan = plan_build(user_cmake_args)
    stamp = _stamp_path()
    if not force and stamp.is_file():
        try:
            same = json.loads(stamp.read_text()).get("key") == plan.key
        except ValueError:
            same = False
        if same and installed_series() == plan.marker:
            _log(f"runtime up to date ({plan.marker})")
            return plan
    wheel = build_wheel(plan)
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
