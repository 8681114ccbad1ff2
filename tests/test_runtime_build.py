"""The patch series and the patched-runtime build (otter_gguf.runtime.build)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otter_gguf.runtime import build as rb
from otter_gguf_converter.llamacpp import pinned_llama_cpp_source

pytestmark = pytest.mark.unit


def test_series_applies_to_pristine_pinned_source(tmp_path: Path) -> None:
    pristine = pinned_llama_cpp_source()
    work = tmp_path / "llama.cpp"
    shutil.copytree(pristine, work, ignore=shutil.ignore_patterns(".git"))
    patches = rb.patch_series()
    assert patches, "patches/ holds no patch"
    rb.apply_series(work, patches)
    # the marker patch is in: the C API and the CMake cache variable
    assert "llama_otter_series" in (work / "include" / "llama.h").read_text()
    assert "LLAMA_OTTER_SERIES" in (work / "src" / "CMakeLists.txt").read_text()
    # and the pristine cache copy was not touched
    assert "llama_otter_series" not in (pristine / "include" / "llama.h").read_text()


def test_failing_patch_names_patch_and_hunk(tmp_path: Path) -> None:
    pristine = pinned_llama_cpp_source()
    work = tmp_path / "llama.cpp"
    (work / "include").mkdir(parents=True)
    shutil.copy(pristine / "include" / "llama.h", work / "include" / "llama.h")
    bad = tmp_path / "0001-bad.patch"
    bad.write_text(
        "--- a/include/llama.h\n+++ b/include/llama.h\n"
        "@@ -3,3 +3,4 @@\n this line is not there\n nor this\n+added\n and not this\n")
    with pytest.raises(rb.RuntimeBuildError) as e:
        rb.apply_series(work, [bad])
    msg = str(e.value)
    assert "0001-bad.patch" in msg and "include/llama.h" in msg and "line 3" in msg


@pytest.mark.runtime
def test_installed_runtime_reports_current_series() -> None:
    assert rb.installed_series() == rb.SERIES_PREFIX + rb.series_id()
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "runtime is current" in res.stdout


@pytest.mark.runtime
def test_check_reports_stale_runtime(tmp_path: Path) -> None:
    changed = tmp_path / "patches"
    shutil.copytree(rb.patches_dir(), changed)
    first = sorted(changed.glob("*.patch"))[0]
    first.write_text(first.read_text() + "\n")
    env = {**__import__("os").environ, "OTTER_GGUF_PATCHES": str(changed)}
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--check"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 1
    assert "NOT current" in res.stdout


def test_default_flags_never_enable_amx_and_user_args_come_last() -> None:
    args = rb.default_cmake_args()
    assert not any("AMX" in a and a.endswith("=ON") for a in args)
    assert "-DGGML_NATIVE=ON" not in args
    plan = rb.plan_build("-DGGML_BLAS=ON -DGGML_NATIVE=ON")
    # user arguments follow ours, so CMake lets them win
    ours = [i for i, a in enumerate(plan.cmake_args) if a == "-DGGML_NATIVE=OFF"]
    assert all(i < plan.cmake_args.index("-DGGML_NATIVE=ON") for i in ours)
    assert plan.cmake_args[-1].startswith("-DLLAMA_OTTER_SERIES=")
    assert plan.key != rb.plan_build("").key


def test_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb.shutil, "which", lambda name: None)
    with pytest.raises(rb.RuntimeBuildError, match="no C\\+\\+ compiler"):
        rb._check_toolchain()


def test_bad_input_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "patches"
    bad.mkdir()
    (bad / "0001-bad.patch").write_text(
        "--- a/include/llama.h\n+++ b/include/llama.h\n@@ -3,3 +3,4 @@\n nope\n nope\n+x\n nope\n")
    env = {**__import__("os").environ, "OTTER_GGUF_PATCHES": str(bad)}
    # an existing --dev-source directory is refused before anything is written
    existing = tmp_path / "src"
    existing.mkdir()
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--dev-source",
                          str(existing)], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "exists" in res.stderr, res.stderr
    # a patch that does not apply: named, exit 2, no directory left half made
    dest = tmp_path / "dev"
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--dev-source",
                          str(dest)], capture_output=True, text=True, env=env)
    assert res.returncode == 2, res.stderr
    assert "0001-bad.patch" in res.stderr and not dest.exists()
