"""otter-gguf serve under load: 8 clients x 25 mixed requests (streamed, non-streamed,
guided, chat, scoring, mid-stream disconnects) against --parallel 4. Every answer must
be the answer its request gets alone on a fresh server (no mixing), no 5xx, every
sequence freed afterwards, later answers unchanged, RSS flat (--no-cache-prompt: the
prompt cache under concurrency is tests/test_serve_speculative.py's)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.runtime  # ~7 s on the tiny model

PROMPTS = ["The quick brown", "Once upon a time", "Paris is", "In the beginning", "A B C D",
           "hello world", "Numbers: 1 2 3", "The weather today"]
TOL = dict(rtol=1e-3, atol=2e-3)


def _requests():
    """name -> (kind, body) of the distinct requests."""
    reqs = {}
    for i, p in enumerate(PROMPTS):
        reqs[f"plain{i}"] = ("completion", dict(prompt=p, max_tokens=6 + i % 4, temperature=0.7, seed=100 + i,
                                                repeat_penalty=1.0))
        reqs[f"stream{i}"] = ("completion", dict(prompt=p, max_tokens=9, temperature=0, stream=True,
                                                 stop=["in", "e "], repeat_penalty=1.1))
        reqs[f"score{i}"] = ("score", dict(text=p + " and more text"))
        if i % 2 == 0:  # top_k 2 or 3: 3 or 4 of the 4 sequences
            reqs[f"guided{i}"] = ("completion", dict(prompt=p, max_tokens=6, temperature=0.9, seed=i,
                                                     otter={"guidance": {"top_k": 2 + i % 2, "signal": "honesty",
                                                                         "weight": 2.0}}))
        else:
            reqs[f"chat{i}"] = ("chat", dict(messages=[{"role": "user", "content": p}], max_tokens=6,
                                             temperature=0, stream=bool(i % 4 == 1)))
    return reqs


REQS = _requests()


def _call(s, kind, body, disconnect_after=None):
    """The normalised answer of one request over raw HTTP (status, result)."""
    import http.client

    path = {"completion": "/v1/completions", "chat": "/v1/chat/completions", "score": "/v1/otter/score"}[kind]
    conn = http.client.HTTPConnection(s.host, s.port, timeout=120)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        out = (r.status, r.read().decode())
        conn.close()
        return out
    if kind == "score":
        d = json.loads(r.read())
        conn.close()
        return 200, {"tokens": d["tokens"], "signals": d["signals"]}
    if not body.get("stream"):
        d = json.loads(r.read())
        conn.close()
        c = d["choices"][0]
        return 200, {"text": c["text"] if kind == "completion" else c["message"]["content"],
                     "finish": c["finish_reason"], "tokens": c["otter"]["tokens"], "signals": c["otter"]["signals"]}
    text, toks, sigs, finish, n = "", [], [], None, 0
    buf = b""
    while True:
        line = r.readline()
        if not line:
            break
        buf += line
        if line != b"\n":
            continue
        ev, buf = buf.decode().strip(), b""
        assert ev.startswith("data: "), ev
        if ev == "data: [DONE]":
            break
        c = json.loads(ev[6:])["choices"][0]
        n += 1
        if disconnect_after is not None and n >= disconnect_after:
            conn.close()  # the client goes away mid-stream
            return 200, None
        text += c.get("text") or (c.get("delta") or {}).get("content") or ""
        if c.get("otter"):
            toks += c["otter"]["tokens"]
            sigs += c["otter"]["signals"]
        finish = c["finish_reason"] or finish
    conn.close()
    return 200, {"text": text, "finish": finish, "tokens": toks, "signals": sigs}


def _same(got, want, tol) -> bool:
    if got is None or want is None:
        return False
    if {k: v for k, v in got.items() if k != "signals"} != {k: v for k, v in want.items() if k != "signals"}:
        return False
    return np.allclose(np.array(got["signals"], dtype=float), np.array(want["signals"], dtype=float), **tol)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_eight_clients_mixed_requests_parallel_4(gguf_models):
    import llama_cpp

    from otter_gguf.server import ServeConfig, create_app
    from otter_gguf.server.background import BackgroundServer

    # no prompt cache: seeded sampling compares exact tokens, and reused prefixes change the decode shapes (and
    # so the rounding) more; the cache under concurrency: tests/test_serve_speculative.py (greedy)
    cfg = ServeConfig(model=str(gguf_models.otter("reward3")), parallel=4, ctx_size=256, n_batch=64, threads=1,
                      cache_prompt=False)
    app = create_app(cfg)
    engine = app.state.server.engine
    with BackgroundServer(app) as s:
        # every request alone on the fresh server: the expected answers
        want = {}
        for name, (kind, body) in REQS.items():
            st, res = _call(s, kind, body)
            assert st == 200, (name, res)
            want[name] = res
        assert any(w["finish"] == "stop" for n, w in want.items() if n.startswith("stream"))
        # warm-up of the concurrent path, then the memory baseline
        for name, (kind, body) in list(REQS.items())[:8]:
            _call(s, kind, body)
        rss0 = _rss_mib()

        names = list(REQS)
        errors, counts = [], {"ok": 0, "disconnect": 0}
        lock = threading.Lock()

        def client(c: int) -> None:
            for j in range(25):
                name = names[(c * 7 + j * 3) % len(names)]
                kind, body = REQS[name]
                cut = 2 if (body.get("stream") and j % 5 == 0) else None
                if cut is not None:
                    body = dict(body, max_tokens=60, stop=None)  # long enough to still run when dropped
                try:
                    st, res = _call(s, kind, body, disconnect_after=cut)
                except Exception as e:  # noqa: BLE001 - reported below
                    st, res = -1, repr(e)
                with lock:
                    if st != 200:
                        errors.append((name, st, res))
                    elif cut is not None:
                        counts["disconnect"] += 1
                    elif not _same(res, want[name], TOL):
                        errors.append((name, "mixed", res, want[name]))
                    else:
                        counts["ok"] += 1

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[:3]
        assert counts["ok"] + counts["disconnect"] == 200 and counts["disconnect"] >= 8
        assert engine.peak_sequences == 4  # requests really were decoded together

        # every sequence is free again and the KV cache holds nothing
        for _ in range(100):
            if engine.active == 0 and engine.free_sequences == 4:
                break
            time.sleep(0.05)
        assert engine.active == 0 and engine.free_sequences == 4 and engine.queue_depth == 0
        # the KV cache holds nothing
        mem = llama_cpp.llama_get_memory(app.state.server.llm._ctx.ctx)
        assert [llama_cpp.llama_memory_seq_pos_max(mem, q) for q in range(4)] == [-1] * 4
        assert not engine._held and engine.cached_tokens == 0
        # later answers are those of the fresh server
        for name, (kind, body) in REQS.items():
            st, res = _call(s, kind, body)
            assert st == 200 and _same(res, want[name], dict(rtol=0, atol=1e-5)), (name, res, want[name])
        rss1 = _rss_mib()
        assert rss1 <= rss0 * 1.05, (rss0, rss1)
        print(f"200 requests in {elapsed:.1f} s, RSS {rss0:.0f} -> {rss1:.0f} MiB")
