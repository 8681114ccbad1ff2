"""The patch series and the patched-runtime build (otter_gguf.runtime.build)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otter_gguf.io.llama_source import pinned_llama_cpp_source
from otter_gguf.runtime import build as rb

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


# -- progress, log and failure output of the build ------------------------------------------------

# what `pip wheel -v` of llama-cpp-python prints (scikit-build-core + Ninja), shortened
_BUILD_OUTPUT = (["Processing ./llama_cpp_python-0.3.36", "  Installing build dependencies: started",
                  "  *** Configuring CMake...", "  -- The C compiler identification is GNU 12.2.0",
                  "  *** Building project with Ninja..."]
                 + [f"  [{i}/141] Building CXX object vendor/llama.cpp/src/CMakeFiles/llama.dir/f{i}.cpp.o"
                    for i in range(1, 142)]
                 + ["  *** Installing project into wheel...", "  *** Created llama_cpp_python-0.3.36.whl"])
# the same steps as verbose Ninja prints them (pip wheel -v): the commands
_VERBOSE_STEPS = {
    "  [1/141] /usr/bin/g++ -DGGML_BUILD -O3 -o vendor/CMakeFiles/ggml-base.dir/ggml.cpp.o "
    "-c /tmp/b/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml.cpp": "ggml.cpp",
    "  [11/141] : && /usr/bin/g++ -fPIC -O3 -shared -Wl,-soname,libggml-base.so.0 "
    "-o bin/libggml-base.so.0.25.3 vendor/x.o && :": "libggml-base.so.0.25.3",
    "  [12/141] Linking CXX shared library bin/libllama.so": "libllama.so",
}


def test_progress_is_phases_and_a_line_per_tenth_of_the_compile_steps() -> None:
    import io

    out = io.StringIO()
    p = rb.BuildProgress(out, tty=False)
    for line in _BUILD_OUTPUT:
        p.feed(line + "\n")
    p.close()
    text = out.getvalue().splitlines()
    phases = [ln.split(" ...")[0] for ln in text if " ... (" in ln]
    assert phases == ["otter-gguf: preparing the build", "otter-gguf: configuring (CMake)",
                      "otter-gguf: compiling", "otter-gguf: packing the wheel"]
    steps = [ln for ln in text if ln.startswith("otter-gguf:   [")]
    # 141 steps -> one line at each new tenth (1, 15, 29, ..., 141), with the file and the elapsed time
    assert [int(s.split("[")[1].split("/")[0]) for s in steps] == [1, 15, 29, 43, 57, 71, 85, 99, 113, 127, 141]
    assert steps[-1].startswith("otter-gguf:   [141/141] f141.cpp (") and steps[-1].endswith("s)")
    assert (p.done, p.total) == (141, 141)


def test_progress_on_a_terminal_is_a_tqdm_bar() -> None:
    import io

    out = io.StringIO()
    p = rb.BuildProgress(out, tty=True)
    for line in _BUILD_OUTPUT[:60]:
        p.feed(line)
    assert p.bar is not None and (p.bar.n, p.bar.total) == (55, 141)
    p.close()
    text = out.getvalue()
    assert "otter-gguf: compiling [55/141]" in text and "f55.cpp" in text and "\r" in text


def test_run_logged_keeps_the_whole_output(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("header\n")
    script = "import sys\nfor i in range(1, 4): print(f'[{i}/3] Building C object x/y{i}.c.o')\nsys.exit(3)"
    rc = rb.run_logged([sys.executable, "-c", script], None, log, rb.BuildProgress(open(tmp_path / "p", "w"),
                                                                                   tty=False))
    assert rc == 3
    lines = log.read_text().splitlines()
    assert lines[0] == "header" and lines[1].startswith(f"$ {sys.executable} -c ")
    assert lines[-4:] == [f"[{i}/3] Building C object x/y{i}.c.o" for i in (1, 2, 3)] + ["[exit status 3]"]


def test_relevant_lines_are_the_errors_not_the_whole_log() -> None:
    lines = ([f"  [{i}/141] Building CXX object f{i}.cpp.o" for i in range(1, 100)]
             + ["  FAILED: f100.cpp.o", "  /usr/bin/c++ -Werror -c f100.cpp",
                "  f100.cpp:3:1: error: 'x' was not declared in this scope",
                "      3 | x;", "  ninja: build stopped: subcommand failed.",
                "  note: This error originates from a subprocess, and is likely not a problem with pip."])
    got = rb.relevant_lines(lines)
    assert got == ["  FAILED: f100.cpp.o", "  /usr/bin/c++ -Werror -c f100.cpp",
                   "  f100.cpp:3:1: error: 'x' was not declared in this scope", "      3 | x;",
                   "  ninja: build stopped: subcommand failed."]
    # nothing error-like: the last lines
    assert rb.relevant_lines([f"line {i}" for i in range(100)], limit=3) == ["line 97", "line 98", "line 99"]


def _scratch_cache(tmp_path: Path) -> dict[str, str]:
    """An empty otter-gguf cache holding only the pinned sdist (no runtime wheel): a build in it is cold."""
    from otter_gguf.io.llama_source import fetch_sdist

    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    sdist = fetch_sdist()
    (cache / "sdist" / sdist.name).symlink_to(sdist)
    return {**__import__("os").environ, "OTTER_GGUF_CACHE": str(cache)}


def test_broken_compiler_flag_fails_at_configure_with_the_errors_and_the_log(tmp_path: Path) -> None:
    import time

    env = _scratch_cache(tmp_path)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--no-install",
                          "--cmake-args", "-DCMAKE_C_FLAGS=-fno-such-otter-flag -DCMAKE_CXX_FLAGS=-fno-such-otter-flag"],
                         capture_output=True, text=True, env=env)
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stderr
    err = res.stderr
    assert "otter-gguf: configuring (CMake) ..." in err
    assert "Error: runtime wheel build failed while configuring (CMake) after" in err
    assert "unrecognized command-line option" in err and "-fno-such-otter-flag" in err
    assert "note: This error originates" not in err and "Traceback" not in err
    logs = list((Path(env["OTTER_GGUF_CACHE"]) / "logs").glob("runtime-*.log"))
    assert len(logs) == 1 and err.rstrip().endswith(f"full log: {logs[0]}")
    log = logs[0].read_text()
    assert "-DCMAKE_C_FLAGS=-fno-such-otter-flag" in log and "Configuring incomplete" in log
    assert not list((Path(env["OTTER_GGUF_CACHE"]) / "wheels").glob("*/*.whl"))
    assert took < 60, f"a broken flag took {took:.0f} s to fail"


def test_patch_that_does_not_apply_fails_before_cmake_exit_2(tmp_path: Path) -> None:
    env = _scratch_cache(tmp_path)
    bad = tmp_path / "patches"
    bad.mkdir()
    (bad / "0001-bad.patch").write_text(
        "--- a/include/llama.h\n+++ b/include/llama.h\n@@ -3,3 +3,4 @@\n nope\n nope\n+x\n nope\n")
    env["OTTER_GGUF_PATCHES"] = str(bad)
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--no-install"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2, res.stderr
    assert "Error: patch 0001-bad.patch does not apply" in res.stderr and "include/llama.h" in res.stderr
    assert "configuring" not in res.stderr and "Traceback" not in res.stderr


# -- --portable, --wheel-out ----------------------------------------------------------------------

_V3_ON = ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]
_V3_OFF = ["-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF",
           "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def test_portable_plan_is_x86_64_v3_whatever_this_cpu_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS")
    plans = []
    for flags in [set(), {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}]:
        monkeypatch.setattr(rb, "_cpu_flags", lambda f=flags: f)
        plans.append(rb.plan_build(portable=True))
    a, b = plans
    assert a.cmake_args == b.cmake_args and a.key == b.key and a.portable
    args = a.cmake_args
    assert args[:6] == rb._BASE_CMAKE_ARGS and args[6] == "-DGGML_NATIVE=OFF"
    assert sorted(args[7:7 + 13]) == sorted(_V3_ON + _V3_OFF)
    # the default backends' options (the RPC backend), then CMAKE_ARGS (Metal/CUDA/BLAS) after ours, the series last
    assert args[20:] == ["-DGGML_RPC=ON", "-DGGML_BLAS=ON", "-DGGML_BLAS_VENDOR=OpenBLAS",
                         f"-DLLAMA_OTTER_SERIES={rb.series_id()}"]
    # a native plan on an AVX-512 machine differs (and so does its cache key)
    native = rb.plan_build()
    assert "-DGGML_AVX512=ON" in native.cmake_args and native.key != a.key and not native.portable


def _fake_cached_wheel(cache: Path, plan: rb.BuildPlan) -> bytes:
    d = cache / "wheels" / plan.key
    d.mkdir(parents=True)
    data = f"not really a wheel: {plan.key}".encode()
    (d / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(data)
    return data


_V3_FLAGS = {"avx", "avx2", "fma", "f16c", "bmi2", "sse4_2", "popcnt"}
_CPUS = {"x86-64-v3": _V3_FLAGS,  # e.g. an AMD EPYC with AVX2 and no AVX-512
         "avx512": _V3_FLAGS | {"avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni"}}


@pytest.mark.parametrize("cpu", sorted(_CPUS))
def test_native_plan_is_the_portable_plan_exactly_on_an_x86_64_v3_cpu(monkeypatch: pytest.MonkeyPatch, cpu) -> None:
    monkeypatch.setattr(rb.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(rb, "_cpu_flags", lambda: set(_CPUS[cpu]))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    native, portable = rb.plan_build(), rb.plan_build(portable=True)
    same = cpu == "x86-64-v3"
    assert (native.key == portable.key) is same and (native.cmake_args == portable.cmake_args) is same
    # a native plan that is the portable one says so (build log, build.json, doctor)
    assert native.portable is same and portable.portable


@pytest.mark.parametrize("cpu", sorted(_CPUS))
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_wheel_out_keeps_the_wheel_of_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture, portable, cpu) -> None:
    """--wheel-out copies the cached wheel of the plan asked for; where both plans are one (an
    x86-64-v3 CPU), that one wheel serves both."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OTTER_GGUF_CACHE", str(cache))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.setattr(rb.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(rb, "_cpu_flags", lambda: set(_CPUS[cpu]))
    wheels = {}
    for p in (portable, not portable):
        plan = rb.plan_build(portable=p)
        if plan.key not in wheels:
            wheels[plan.key] = _fake_cached_wheel(cache, plan)
    assert len(wheels) == (1 if cpu == "x86-64-v3" else 2)
    out = tmp_path / "out"
    rb.build_runtime(portable=portable, wheel_out=out, install=False)
    (kept,) = out.iterdir()
    assert kept.name == "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    assert kept.read_bytes() == wheels[rb.plan_build(portable=portable).key]
    err = capsys.readouterr().err
    assert f"wheel kept: {kept}" in err and "installing" not in err


def test_cli_wheel_out_on_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI path of --wheel-out with this machine's own flags, whatever they are."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OTTER_GGUF_CACHE", str(cache))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    plan = rb.plan_build(portable=True)
    want = _fake_cached_wheel(cache, plan)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--no-install", "--portable",
                          "--wheel-out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (kept,) = out.iterdir()
    assert kept.read_bytes() == want and f"wheel kept: {kept}" in res.stderr and "installing" not in res.stderr


def test_build_skips_the_common_library_the_package_never_loads(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The sdist forces llama.cpp's common library on; the build turns that line off, refuses an
    sdist without the line, and the edit is part of the cache key."""
    sdist_root = pinned_llama_cpp_source().parents[1]
    shutil.copy(sdist_root / "CMakeLists.txt", tmp_path / "CMakeLists.txt")
    rb.edit_sdist(tmp_path)
    text = (tmp_path / "CMakeLists.txt").read_text()
    assert 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)' in text
    assert "LLAMA_BUILD_COMMON ON" not in text
    # the RPC server (tools/rpc, ggml only) is built and installed beside the libraries when GGML_RPC is on
    assert text.index("add_subdirectory(vendor/llama.cpp/tools/rpc") > text.index("add_subdirectory(vendor/llama.cpp)\n")
    assert "llama_cpp_python_install_target(ggml-rpc-server)" in text
    with pytest.raises(rb.RuntimeBuildInputError, match="not the llama-cpp-python 0.3.36 sdist"):
        rb.edit_sdist(tmp_path)
    key = rb.plan_build("").key
    monkeypatch.setattr(rb, "_SDIST_EDITS", ())
    assert rb.plan_build("").key != key


def test_backends_choose_the_cmake_options_and_the_cache_key() -> None:
    default = rb.plan_build("")
    assert default.backends == ("cpu", "rpc") and "-DGGML_RPC=ON" in default.cmake_args
    cpu = rb.plan_build("", backends=["cpu"])
    assert cpu.backends == ("cpu",) and not any("GGML_RPC" in a for a in cpu.cmake_args) and cpu.key != default.key
    vk = rb.plan_build("", backends=["vulkan", "rpc"])  # the CPU always in, the order fixed
    assert vk.backends == ("cpu", "rpc", "vulkan") and "-DGGML_VULKAN=ON" in vk.cmake_args
    assert vk.key not in (default.key, cpu.key)
    assert rb.plan_build("", backends=["rpc", "vulkan"]).key == vk.key
    assert "-DGGML_CUDA=ON" in rb.plan_build("", backends=["cuda"]).cmake_args
    assert "-DGGML_METAL=ON" in rb.plan_build("", backends=["metal"]).cmake_args
    with pytest.raises(rb.RuntimeBuildInputError, match="unknown backend 'opencl': expected one or more of cpu, rpc"):
        rb.plan_build("", backends=["opencl"])


def test_cli_unknown_backend_exits_2() -> None:
    res = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "build-runtime", "--backend", "cpu,opencl",
                          "--no-install"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown backend 'opencl'" in res.stderr, res.stderr


def test_vulkan_build_guards_the_layer_settings_block(tmp_path: Path) -> None:
    """With --backend vulkan the vk::LayerSettingEXT lines of ggml-vulkan.cpp (Vulkan headers 1.3.261+) compile
    only where the headers declare VK_EXT_layer_settings, with a plain InstanceCreateInfo otherwise."""
    sdist_root = pinned_llama_cpp_source().parents[1]
    shutil.copy(sdist_root / "CMakeLists.txt", tmp_path / "CMakeLists.txt")
    vk = tmp_path / rb._VULKAN_SOURCE
    vk.parent.mkdir(parents=True)
    original = (sdist_root / rb._VULKAN_SOURCE).read_text()
    vk.write_text(original)
    rb.edit_sdist(tmp_path, ("cpu",))
    assert vk.read_text() == original  # not touched without the Vulkan backend
    shutil.copy(sdist_root / "CMakeLists.txt", tmp_path / "CMakeLists.txt")
    rb.edit_sdist(tmp_path, ("cpu", "vulkan"))
    text = vk.read_text()
    guarded = text[text.index("#if defined(VK_EXT_layer_settings)"):]
    guarded = guarded[:guarded.index("#endif") + len("#endif")]
    assert "vk::LayerSettingEXT" in guarded and "#else" in guarded
    assert "vk::LayerSettingEXT" not in text.replace(guarded, "")
    assert rb._VULKAN_INSTANCE_INFO_PLAIN in guarded
    assert rb.plan_build("", backends=["vulkan"]).key != rb.plan_build("", backends=["cpu", "rpc"]).key


def test_progress_names_the_file_of_each_step() -> None:
    import io

    for line, name in _VERBOSE_STEPS.items():
        out = io.StringIO()
        p = rb.BuildProgress(out, tty=False)
        p.feed(line)
        assert out.getvalue().splitlines()[-1].startswith(f"otter-gguf:   [{line.split('[')[1].split(']')[0]}] "
                                                          f"{name} ("), out.getvalue()
