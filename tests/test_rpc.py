"""Otter heads split over ggml's RPC backend: two ``ggml-rpc-server`` processes on 127.0.0.1 and the local CPU.

The runtime's own ``ggml-rpc-server`` (built with it) runs the same CPU kernels remotely, so a model split
over the servers (``rpc_servers``, ``n_gpu_layers``, ``tensor_split``: llama.cpp's ``--rpc -ngl -ts``) must give:
base logits bit-identical to the same split of the base GGUF, and signals equal to the CPU-only run
(measured here: identical, max |diff| 0.0; asserted to RPC_TOL). The Otter tensors follow their base layers
onto the servers, the side K/V layers live where their base layer's K/V lives (checked in llama.cpp's log).
A server killed mid-run: the served request gets a 502 naming the RPC servers and the server process
exits (llama.cpp's RPC client aborts; docs/RUNTIME.md "Backends").
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import LLAMA_KW, openai_client, serve_tiny

pytestmark = pytest.mark.runtime

TOKS = [1] + list(range(20, 70))
#: signals over RPC against the CPU-only run: the same kernels, so measured identical (max |diff| 0.0)
RPC_TOL = dict(rtol=1e-6, atol=1e-6)
#: (n_gpu_layers, tensor_split) of the splits: layer 0 local + layers 1-3 over the two servers;
#: every layer and the output layer over the two servers
SPLITS = [(3, [1, 1]), (-1, [1, 3])]


@pytest.fixture(scope="module")
def servers(otter_runtime):
    """Two RPC servers this test process connects to (one client each: the process keeps its connection)."""
    from otter_gguf.runtime.backends import LocalRpcServers

    with LocalRpcServers(2) as s:
        yield s


@pytest.fixture(scope="module")
def files(gguf_models):
    """(base GGUF, one-file reward3 Otter GGUF, token_reward sidecar, reward1 sidecar)."""
    return (gguf_models.base, gguf_models.otter("reward3"), *gguf_models.sidecars)


def _load(path, **kw):
    from otter_gguf import OtterLlama

    return OtterLlama(str(path), **{**LLAMA_KW, "logits_all": True, **kw})


def _eval(path, **kw):
    """(logits [T, V], signals [T, n_out] or None) of TOKS in one decode."""
    llm = _load(path, **kw)
    try:
        llm.eval(TOKS)
        logits = np.array(llm.scores[: len(TOKS)], dtype=np.float32)
        sig = np.array(llm.signals[: len(TOKS)], dtype=np.float32) if llm.has_otter else None
        return logits, sig
    finally:
        llm.close()


def _split(servers, ngl, ts):
    return dict(rpc_servers=servers.spec, n_gpu_layers=ngl, tensor_split=ts)


@pytest.mark.parametrize("ngl,ts", SPLITS)
def test_one_file_split_base_logits_bit_identical_signals_equal_cpu(servers, files, ngl, ts):
    from otter_gguf.io.llama_log import llama_logs

    base, otter, _, _ = files
    base_cpu, _ = _eval(base)
    otter_cpu, sig_cpu = _eval(otter)
    base_rpc, _ = _eval(base, **_split(servers, ngl, ts))
    with llama_logs(log_level=None) as log:
        otter_rpc, sig_rpc = _eval(otter, **_split(servers, ngl, ts))
    assert np.array_equal(otter_rpc, base_rpc), "base logits of the Otter model differ from the base GGUF's split"
    assert np.array_equal(otter_cpu, base_cpu)
    assert sig_rpc.shape == sig_cpu.shape and np.isfinite(sig_rpc).all()
    np.testing.assert_allclose(sig_rpc, sig_cpu, **RPC_TOL)
    # the layers went where asked, the side K/V layers (4..7) with their base layers (0..3)
    text = "\n".join(log)
    kv = dict(re.findall(r"llama_kv_cache: layer +(\d+): dev = (\S+)", text))
    assert len(kv) == 8 or (ngl == 3 and len(kv) == 6), text[-3000:]
    for il in range(4):
        assert kv.get(str(il + 4)) == kv.get(str(il)), kv
    assert "offloaded 5/5 layers" in text if ngl == -1 else "offloaded 3/5 layers" in text
    assert len(set(v for v in kv.values())) == 2  # both servers hold layers


def test_split_mode_none_puts_everything_on_main_gpu(servers, files):
    """-sm none -mg 1: the whole model, side layers and side K/V included, on the second server."""
    from otter_gguf.io.llama_log import llama_logs

    base, otter, _, _ = files
    kw = dict(rpc_servers=servers.spec, n_gpu_layers=-1, split_mode=0, main_gpu=1)
    base_rpc, _ = _eval(base, **kw)
    with llama_logs(log_level=None) as log:
        otter_rpc, sig_rpc = _eval(otter, **kw)
    _, sig_cpu = _eval(otter)
    assert np.array_equal(otter_rpc, base_rpc)
    np.testing.assert_allclose(sig_rpc, sig_cpu, **RPC_TOL)
    text = "\n".join(log)
    kv = dict(re.findall(r"llama_kv_cache: layer +(\d+): dev = (\S+)", text))
    from otter_gguf.runtime import backends

    second = {backends._device(d).name for d in backends.rpc_model_devices(servers.endpoints[1])}
    assert len(kv) == 8 and len(second) == 1 and set(kv.values()) == second, (kv, second)


def test_two_adapter_heads_split_equal_cpu(servers, files):
    base, _, tr, h1 = files
    heads = {"tr": str(tr), "harmless": str(h1)}
    kw = dict(otter_heads=heads, n_seq_max=2)
    base_rpc, _ = _eval(base, **_split(servers, 3, [1, 1]))
    both_rpc, sig_rpc = _eval(base, **kw, **_split(servers, 3, [1, 1]))
    _, sig_cpu = _eval(base, **kw)
    assert np.array_equal(both_rpc, base_rpc)
    assert sig_rpc.shape == sig_cpu.shape == (len(TOKS), 512 + 1)
    np.testing.assert_allclose(sig_rpc, sig_cpu, **RPC_TOL)


def test_completion_with_rewards_over_rpc_equals_cpu(servers, files):
    _, otter, _, _ = files

    def complete(**kw):
        llm = _load(otter, **kw)
        try:
            return llm.create_completion("Once upon a time", max_tokens=12, temperature=0.0, repeat_penalty=1.0)
        finally:
            llm.close()

    cpu, rpc = complete(), complete(**_split(servers, -1, [1, 1]))
    assert rpc["choices"][0]["text"] == cpu["choices"][0]["text"]
    a, b = cpu["choices"][0]["otter"], rpc["choices"][0]["otter"]
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) > 0
    np.testing.assert_allclose(np.array(b["signals"], dtype=np.float64), np.array(a["signals"], dtype=np.float64),
                               **RPC_TOL)


def test_unreachable_server_is_a_named_error(otter_runtime, files):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ValueError, match=rf"cannot reach the RPC server 127\.0\.0\.1:{port}"):
        _load(files[1], rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=-1)
    for bad, why in [("localhost", "not HOST:PORT"), ("127.0.0.1:0", "not HOST:PORT"),
                     ("127.0.0.1:1,127.0.0.1:1", "given twice")]:
        with pytest.raises(ValueError, match=why):
            _load(files[1], rpc_servers=bad)


def test_cli_rpc_option_errors_exit_2(files):
    from click.testing import CliRunner

    from otter_gguf.cli import main

    r = CliRunner().invoke(main, ["score", str(files[1]), "--text", "hi", "--rpc", "nohost"])
    assert r.exit_code == 2 and "--rpc" in r.output and "HOST:PORT" in r.output, r.output
    r = CliRunner().invoke(main, ["score", str(files[1]), "--text", "hi", "-ts", "1,x"])
    assert r.exit_code == 2 and "--tensor-split" in r.output, r.output
    r = CliRunner().invoke(main, ["score", str(files[1]), "--text", "hi", "-ngl", "some"])
    assert r.exit_code == 2 and "'all'" in r.output, r.output


def test_cli_score_over_rpc_equals_cpu(files):
    """`otter-gguf score --rpc -ngl` in its own process (its own two servers) prints the CPU-only signals."""
    import json

    from otter_gguf.runtime.backends import LocalRpcServers

    otter = files[1]
    cmd = [sys.executable, "-m", "otter_gguf.cli", "score", str(otter), "--tokens", ",".join(map(str, TOKS[:20])),
           "--json", "-t", "1"]
    cpu = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    with LocalRpcServers(2) as s:
        rpc = subprocess.run(cmd + ["--rpc", s.spec, "-ngl", "all", "-ts", "1,1"], capture_output=True, text=True,
                             timeout=300)
    assert rpc.returncode == 0, rpc.stderr[-2000:]
    a, b = json.loads(cpu.stdout), json.loads(rpc.stdout)
    assert a["tokens"] == b["tokens"]
    np.testing.assert_allclose(np.array(b["signals"], dtype=np.float64), np.array(a["signals"], dtype=np.float64),
                               **RPC_TOL)


def test_server_with_rpc_and_a_lost_server(otter_runtime, files):
    """`serve --rpc` in its own process: completions with rewards equal to the CPU-only server's; after one
    RPC server is killed the next request gets a 502 naming the RPC servers and the server process exits."""
    import json
    import os
    import socket
    import urllib.error
    import urllib.request

    from otter_gguf.runtime.backends import LocalRpcServers

    otter = files[1]
    body = dict(prompt="Once upon a time", max_tokens=8, temperature=0, repeat_penalty=1.0)
    cfg, ref_srv = serve_tiny(otter, cache_prompt=False)
    try:
        ref = openai_client(ref_srv).completions.create(model="any", **{k: v for k, v in body.items()
                                                                          if k != "repeat_penalty"},
                                                        extra_body={"repeat_penalty": 1.0})
    finally:
        ref_srv.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LocalRpcServers(2) as rpc:
        proc = subprocess.Popen([sys.executable, "-m", "otter_gguf.cli", "serve", str(otter), "--port", str(port),
                                 "-np", "4", "-c", "256", "-b", "64", "-t", "1", "--no-cache-prompt",
                                 "--rpc", rpc.spec, "-ngl", "all"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "serve --rpc did not come up"
                time.sleep(0.2)
            from openai import OpenAI

            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            got = client.completions.create(model="any", prompt=body["prompt"], max_tokens=8, temperature=0,
                                            extra_body={"repeat_penalty": 1.0})
            assert got.choices[0].text == ref.choices[0].text
            a, b = ref.choices[0].model_extra["otter"], got.choices[0].model_extra["otter"]
            assert a["tokens"] == b["tokens"]
            np.testing.assert_allclose(np.array(b["signals"], dtype=np.float64),
                                       np.array(a["signals"], dtype=np.float64), **RPC_TOL)

            rpc.kill(1)
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=60)
            assert err.value.code == 502
            msg = json.loads(err.value.read())["error"]["message"]
            assert rpc.spec in msg and "RPC" in msg, msg
            assert proc.wait(timeout=60) != 0  # llama.cpp's RPC client aborts: the server does not go on
            log = proc.stderr.read()
            assert "otter-gguf serve: error:" in log and rpc.spec in log, log[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def test_rpc_server_command_runs_the_runtimes_server(otter_runtime):
    """`otter-gguf rpc-server` runs the ggml-rpc-server built with the runtime, with its own options."""
    from otter_gguf.runtime.backends import rpc_server_binary

    assert rpc_server_binary().name == "ggml-rpc-server"
    r = subprocess.run([sys.executable, "-m", "otter_gguf.cli", "rpc-server", "--help"], capture_output=True,
                       text=True, timeout=60)
    out = r.stdout + r.stderr
    assert "-p, --port PORT" in out and "-H, --host HOST" in out, out


def test_bench_over_rpc_runs_every_worker_on_the_servers(otter_runtime, tmp_path):
    """`otter-gguf bench --rpc -ngl all`: each worker process offloads to the servers (one client at a time);
    the report records the offload."""
    import json

    from click.testing import CliRunner

    from otter_gguf.cli.bench import bench_command
    from otter_gguf.runtime.backends import LocalRpcServers

    out = tmp_path / "r.json"
    with LocalRpcServers(2) as s:
        res = CliRunner().invoke(bench_command, [
            "--quick", "-t", "1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--sections", "main",
            "--configs", "a,b", "--rpc", s.spec, "-ngl", "all", "--n-prompt", "8", "--n-decode", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(out.read_text())
    assert rep["meta"]["options"]["offload"] == {"n_gpu_layers": -1, "rpc_servers": s.spec}
    (run,) = rep["main"]
    for c in ("a", "b"):
        assert run["configs"][c]["decode_tok_s"]["median"] > 0, c
    # the servers are gone: a usage error naming them, before any worker starts
    res = CliRunner().invoke(bench_command, ["--quick", "--cache-dir", str(tmp_path / "cache"), "--rpc", s.spec])
    assert res.exit_code == 2 and "cannot reach the RPC server" in res.output and s.endpoints[0] in res.output, \
        res.output
