"""otter-gguf installed like a package, with no checkout: the wheel and the sdist
carry the patch series, and a fresh venv outside the source tree gets the
runtime with `build-runtime` (from the cached runtime wheel), checks it, and
scores a fixture model exactly like the checkout's install."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import PORTABLE

from otter_gguf.runtime import build as rb

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# otter-gguf's light dependencies (and llama-cpp-python's), pinned to this venv's versions:
# the fresh venvs get the same packages (from pip's cache) and no torch
LIGHT_DEPS = ["numpy", "safetensors", "click", "gguf", "tqdm", "platformdirs",
              "typing-extensions", "diskcache", "jinja2"]


def _tracked_files() -> list[str]:
    res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in res.stdout.split("\0") if f]


def _source_copy(dest: Path) -> Path:
    """The working tree's tracked and untracked (not ignored) files, so building
    leaves nothing (build/, *.egg-info) in the checkout."""
    res = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    for rel in filter(None, res.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """{"wheel": ..., "sdist": ...} of otter-gguf, built from a copy of the tree."""
    src = _source_copy(tmp_path_factory.mktemp("otter-src"))
    out = tmp_path_factory.mktemp("otter-dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", str(src), "-w", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    # the PEP 517 hook `python -m build --sdist` calls
    res = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; "
                          f"print(b.build_sdist({str(out)!r}))"], cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = out.glob("otter_gguf-*.whl")
    (sdist,) = out.glob("otter_gguf-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.unit
def test_wheel_and_sdist_carry_the_patch_series_and_every_package(dists):
    series = {p.name: p.read_bytes() for p in sorted((ROOT / "patches").glob("*.patch"))}
    assert len(series) >= 5
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = set(z.namelist())
        in_wheel = {Path(n).name: z.read(n) for n in names if n.startswith("otter_gguf/_patches/")}
    assert in_wheel == series  # byte for byte: the same series hash as the checkout
    # every committed file of the package (modules, data, the demo model) is in the wheel:
    # pyproject.toml lists the packages and their data by hand
    for rel in _tracked_files():
        if rel.split("/")[0] in ("otter_gguf", "converter"):
            installed = rel.replace("converter/", "otter_gguf_converter/", 1)
            assert installed in names, f"{rel} is missing from the wheel (pyproject [tool.setuptools])"
    with tarfile.open(dists["sdist"]) as t:
        top = t.getnames()[0].split("/")[0]
        in_sdist = {Path(m.name).name: t.extractfile(m).read() for m in t.getmembers()
                    if m.name.startswith(f"{top}/patches/") and m.name.endswith(".patch")}
    assert in_sdist == series


def _fresh_venv(root: Path) -> tuple[Path, dict[str, str]]:
    """A new venv (no system site-packages) with otter-gguf's light dependencies, and the
    environment to run it in: PATH is the venv's bin only (no compiler, no cmake), so a
    runtime wheel missing from the cache fails at once (exit 2) instead of compiling."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    pins = [f"{d}=={importlib.metadata.version(d)}" for d in LIGHT_DEPS]
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", *pins], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LLAMA_CPP_LIB_PATH",
                                                           "OTTER_GGUF_PATCHES")}
    env["PATH"] = str(venv / "bin")
    return venv, env


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installed_package_builds_checks_and_scores_without_a_checkout(kind, dists, gguf_models, otter_runtime,
                                                                       tmp_path):
    from otter_gguf import OtterLlama

    model = gguf_models.otter("reward3")
    plan = rb.plan_build(portable=PORTABLE)
    portable = ["--portable"] if PORTABLE else []
    assert rb.cached_wheel(plan) is not None, (
        f"no cached runtime wheel for {plan.marker} in {rb.cache_dir()}: run `make runtime` first")
    venv, env = _fresh_venv(tmp_path)
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                          "--disable-pip-version-check", str(dists[kind])],
                         capture_output=True, text=True, env={**os.environ, "PATH": os.environ["PATH"]})
    assert res.returncode == 0, res.stderr[-3000:]
    site = next((venv / "lib").glob("python3*/site-packages"))
    exe = str(venv / "bin" / "otter-gguf")

    def cli(*args):
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env)

    # no runtime yet: --check says so (exit 1) and names this install's series; so does doctor
    r = cli("build-runtime", "--check")
    assert r.returncode == 1 and "no patched runtime" in r.stdout and plan.marker in r.stdout, r.stdout + r.stderr
    assert str(site / "otter_gguf" / "_patches") in r.stdout
    r = cli("doctor")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "  llama-cpp-python  not installed\n" in r.stdout and "  torch             not installed" in r.stdout
    assert (f"  package series    {plan.marker} ({site / 'otter_gguf' / '_patches'})" in r.stdout)
    assert ("1 problem(s):\n  - llama-cpp-python (the runtime) is not installed\n"
            "    fix: run `otter-gguf build-runtime`") in r.stdout
    # build-runtime takes the cached wheel (same series, CMake args, Python, machine) and installs it
    r = cli("build-runtime", *portable)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "using the cached runtime wheel" in r.stderr and f"runtime installed ({plan.marker})" in r.stderr
    r = cli("build-runtime", "--check")
    assert r.returncode == 0 and f"runtime is current: {plan.marker}" in r.stdout, r.stdout + r.stderr
    # scores: the same tokens and signals as this checkout's runtime
    ctx = ["--ctx-size", "256", "--threads", "1", "--batch-size", "64"]
    r = cli("score", model, "--text", "The quick brown fox", "--json", *ctx)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ref = OtterLlama(str(model), n_ctx=256, n_threads=1, n_threads_batch=1, n_batch=64, verbose=False).score(
        "The quick brown fox")
    assert out["tokens"] == ref.tokens and out["signal_names"] == ["helpfulness", "harmlessness", "honesty"]
    np.testing.assert_allclose(out["signals"], ref.signals, atol=1e-6)
    # runs (greedy: the checkout's tokens), with no llama.cpp line on stderr
    r = cli("run", model, "-p", "The quick brown fox", "-n", "3", "--temp", "0", "--json", *ctx)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    ref_run = OtterLlama(str(model), n_ctx=256, n_threads=1, n_threads_batch=1, n_batch=64, verbose=False)(
        "The quick brown fox", max_tokens=3, temperature=0)
    assert json.loads(r.stdout)["choices"][0]["text"] == ref_run["choices"][0]["text"]
    # a healthy install
    r = cli("doctor")
    assert r.returncode == 0 and r.stdout.endswith("no problems found\n"), r.stdout + r.stderr
    assert f"  runtime series    {plan.marker}\n" in r.stdout
    # the default build's backends (CPU and the RPC client) and its rpc-server beside the libraries
    assert re.search(r"^  ggml backends     (.*, )?RPC(, .*)?$", r.stdout, re.M), r.stdout
    assert re.search(r"^  ggml backends     (.*, )?CPU(, .*)?$", r.stdout, re.M), r.stdout
    assert re.search(r"^  rpc-server        \S+/llama_cpp/lib/ggml-rpc-server$", r.stdout, re.M), r.stdout
    assert f"  library           {site / 'llama_cpp' / 'lib'}" in r.stdout
    assert "  llama-cpp-python  0.3.36\n" in r.stdout
    # and the package it ran is the installed one, not this checkout
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import otter_gguf; print(otter_gguf.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.stdout.strip().startswith(str(site)), r.stdout


# -- doctor ---------------------------------------------------------------------------------------

@pytest.mark.unit
def test_doctor_reads_the_compiled_cpu_features() -> None:
    from otter_gguf.tools.doctor import compiled_cpu_features

    info = "CPU : SSE3 = 1 | AVX = 1 | AVX_VNNI = 0 | AVX2 = 1 | AVX512 = 0 | REPACK = 1 | "
    assert compiled_cpu_features(info) == ["SSE3", "AVX", "AVX2", "REPACK"]


@pytest.mark.unit
def test_doctor_reports_a_runtime_killed_by_an_illegal_instruction(tmp_path: Path) -> None:
    from otter_gguf.tools import doctor

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -ILL $$\n")
    fake.chmod(0o755)
    assert doctor._probe_runtime(str(fake)) == (None, "loading the runtime killed the process (SIGILL)")


@pytest.mark.unit
def test_doctor_names_each_problem_and_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from otter_gguf.tools import doctor

    want = rb.SERIES_PREFIX + rb.series_id()
    probe = {"library": "/x/libllama.so", "series": want, "backends": ["CPU"], "devices": ["CPU (x)"],
             "system_info": "CPU : AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | "}
    monkeypatch.setattr(doctor, "_version", lambda d: None if d == "torch" else "1.0")
    monkeypatch.setattr(doctor, "_probe_runtime", lambda python: (dict(probe), None))
    monkeypatch.setattr(rb, "_cpu_flags", lambda: {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni"})
    r = doctor.diagnose()
    assert r.ok and r.cpu_features == ["AVX", "AVX2", "AVX512", "AVX512_VNNI"]
    text = doctor.format_report(r)
    assert f"runtime series    {want}" in text and re.search(r"ggml backends     (.*, )?CPU", text)
    assert "torch             not installed (optional" in text and text.endswith("no problems found")
    # a wheel built on an AVX-512 machine, run on a CPU without it
    monkeypatch.setattr(rb, "_cpu_flags", lambda: {"avx", "avx2", "fma", "f16c", "bmi2"})
    r = doctor.diagnose()
    assert [p.what for p in r.problems] == [
        "the runtime uses CPU features this CPU lacks: AVX512, AVX512_VNNI (it may crash with an illegal instruction)"]
    assert "--portable" in r.problems[0].fix
    # another series, a plain llama.cpp, a crash on load
    monkeypatch.setattr(rb, "_cpu_flags", lambda: set())
    for series, what in [("otter-gguf/0123456789abcdef", "the runtime carries the patch series otter-gguf/0123"),
                         (None, "/x/libllama.so is a plain llama.cpp without the Otter API")]:
        monkeypatch.setattr(doctor, "_probe_runtime", lambda python, s=series: ({**probe, "series": s}, None))
        (p,) = doctor.diagnose().problems
        assert p.what.startswith(what) and "otter-gguf build-runtime" in p.fix
    monkeypatch.setattr(doctor, "_probe_runtime", lambda python: (None, "loading the runtime killed the "
                                                                  "process (SIGILL)"))
    r = doctor.diagnose()
    (p,) = r.problems
    assert "SIGILL" in p.what and "another CPU" in p.fix and "--portable" in p.fix
    assert "1 problem(s):\n  - the runtime does not load" in doctor.format_report(r)


# -- llama.cpp's log in the CLI, run's default context ---------------------------------------------

@pytest.mark.runtime
def test_llama_log_only_with_verbose_and_run_uses_the_training_context(gguf_models, tmp_path):
    from gguf import GGUFReader

    model = gguf_models.otter("reward1")
    n_train = int(GGUFReader(model).fields["llama.context_length"].contents())
    assert n_train == 2048  # the tiny llama fixture: smaller than run's default 4096
    exe = str(Path(sys.executable).parent / "otter-gguf")
    args = ["run", str(model), "-p", "hello world", "-n", "2", "--temp", "0", "--threads", "1"]
    quiet = subprocess.run([exe, *args], capture_output=True, text=True, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    # no llama.cpp line reaches a user: not the context setup, not "padding V cache", not n_ctx_train
    assert quiet.stderr == "", quiet.stderr
    loud = subprocess.run([exe, "--verbose", *args], capture_output=True, text=True, cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert quiet.stdout.splitlines()[:3] == loud.stdout.splitlines()[:3]  # same greedy tokens
    assert f"llama_context: n_ctx                 = {n_train}" in loud.stderr, loud.stderr[-3000:]
    assert "n_ctx_seq (4096) > n_ctx_train" not in loud.stderr
    # an explicit --ctx-size is kept (and llama.cpp's warning about it goes to the log, shown with -v)
    big = subprocess.run([exe, "-v", *args, "--ctx-size", "4096"], capture_output=True, text=True, cwd=tmp_path)
    assert big.returncode == 0 and "n_ctx_seq (4096) > n_ctx_train (2048)" in big.stderr, big.stderr[-2000:]
