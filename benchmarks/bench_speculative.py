"""Speculative decoding with an Otter model: does prompt lookup speed it up as it speeds the base up,
and does guided token_reward decoding get that speed too? (docs/API.md "Speculative decoding")

A copy-heavy task (repeat a given code block with one fix), greedy, 2 threads. For each model, side by
side in one process, each configuration run ``--repeats`` times in turn (ABAB..., medians reported):

  base          the base GGUF (llama_cpp.Llama)
  base+pl       the same with prompt lookup (LlamaPromptLookupDecoding(num_pred_tokens=--draft))
  otter         the Otter GGUF (OtterLlama, a reward head: a reward per token)
  otter+pl      the same with prompt lookup
  guided        the Otter GGUF with a token_reward head, Guidance(weight=1, top_k=10) (ARGS, one pass)
  guided+pl     the same with prompt lookup
  expert        (smollm2) the same guidance with a *trained* token_reward head: a code expert trained by
                ``otter-gguf train --objective next_token`` on Python functions this script writes (a head
                a user guides code with), where the random head of ``guided`` pulls the text anywhere
  expert+pl     the same with prompt lookup

Decode tokens/s is the completion's tokens after the first over the time from the first streamed chunk
to the last (the prompt's decode comes before the first); the acceptance rate is kept drafts over proposed drafts (drafts at positions
the completion reached). Targets (issue 23): the Otter
model's speed-up from prompt lookup within 5% of the base's; guided+pl >= 1.3 x guided.

    python benchmarks/bench_speculative.py --models smollm2 [--models 1b] [--repeats 3] [--json OUT]

Models: ``smollm2`` (SmolLM2-135M-Instruct Q4_1 from PyPI, its demo head at q8_0, a random
token_reward head of the same side shape and the trained code expert, both q8_0), ``1b``
(``otter-gguf bench``'s random 1B llama at q4_k_m with its d2=256 reward and token_reward heads, generated
once into the bench cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


PROMPT = ("Repeat the following code exactly, with the typo in the greeting fixed.\n\n"
          "def greet(name, times=1):\n"
          "    \"\"\"Print a greeting for name, times times.\"\"\"\n"
          "    for _ in range(times):\n"
          "        print(\"Helo, \" + name + \"!\")\n"
          "    return len(name) * times\n\n"
          "def farewell(name):\n"
          "    print(\"Goodbye, \" + name + \".\")\n"
          "    return None\n\n"
          "Fixed code:\n\n"
          "def greet(name, times=1):\n")


class CountingLookup:
    """Prompt lookup that records the drafts it proposes: ``(position, drafts)``."""

    def __init__(self, n: int):
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.inner = LlamaPromptLookupDecoding(num_pred_tokens=n)
        self.calls: list = []

    def __call__(self, input_ids, **kw):
        out = self.inner(input_ids, **kw)
        self.calls.append((len(input_ids), [int(t) for t in out]))
        return out

    def acceptance(self, final) -> tuple:
        """(kept, proposed) drafts of the recorded calls against the final token sequence."""
        kept = proposed = 0
        for pos, drafts in self.calls:
            drafts = drafts[: max(0, len(final) - pos)]
            proposed += len(drafts)
            for j, t in enumerate(drafts):
                if final[pos + j] != t:
                    break
                kept += 1
        return kept, proposed


_NAMES = ("greet", "welcome", "farewell", "thank", "remind", "notify", "praise", "warn", "invite", "cheer")
_ARGS = ("name", "user", "person", "guest", "friend", "who")
_COUNTS = ("times", "count", "n", "repeat", "k")
_WORDS = ("Hello", "Welcome", "Goodbye", "Thanks", "Hi", "Cheers", "Good morning", "See you")


def code_corpus(n: int, seed: int) -> list[dict]:
    """``n`` records of small Python functions in the style of :data:`PROMPT`'s code (``{"text"}``, otter-gguf
    train's next_token format): the code expert's training data. None is the prompt's own code."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fns = []
        for _ in range(rng.randint(1, 3)):
            f, a, c, w = rng.choice(_NAMES), rng.choice(_ARGS), rng.choice(_COUNTS), rng.choice(_WORDS)
            end = rng.choice(("!", ".", "?"))
            if rng.random() < 0.5:
                fns.append(f"def {f}({a}, {c}={rng.randint(1, 3)}):\n"
                           f"    \"\"\"Print a {f} message for {a}, {c} times.\"\"\"\n"
                           f"    for _ in range({c}):\n"
                           f"        print(\"{w}, \" + {a} + \"{end}\")\n"
                           f"    return len({a}) * {c}\n")
            else:
                fns.append(f"def {f}({a}):\n"
                           f"    print(\"{w}, \" + {a} + \"{end}\")\n"
                           f"    return {rng.choice(('None', a, f'len({a})'))}\n")
        out.append({"text": "\n".join(fns)})
    return [r for r in out if "Helo" not in r["text"]]


def _train_expert(base: Path, root: Path, cfg: dict) -> Path:
    """The code expert (cached): a token_reward head trained on :func:`code_corpus`, one Otter GGUF at q8_0."""
    import subprocess

    out = root / "expert-q8_0.gguf"
    if out.exists():
        return out
    data = root / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in code_corpus(400, 0)))
    cmd = [sys.executable, "-m", "otter_gguf.cli", "train", str(base), str(data), "-o", str(root / "expert"),
           "--objective", "next_token", "--d2", str(cfg["otter_hidden_size"]),
           "--h2", str(cfg["otter_num_attention_heads"]), "--h2-kv", str(cfg["otter_num_key_value_heads"]),
           "--f2", str(cfg["otter_intermediate_size"]), "--steps", "100", "--lr", "1e-3", "--seed", "0",
           "--gguf", str(out), "--outtype", "q8_0", "--force", "--no-progress"]
    subprocess.run(cmd, check=True)
    return out


def _models(name: str, cache: Path):
    """(base, otter reward GGUF, otter token_reward GGUF, trained code expert GGUF or None)."""
    if name == "smollm2":
        from otter_gguf.demo import smollm2 as demo
        from otter_gguf.tools.bench import write_random_adapter
        from otter_gguf_converter import convert, inspect_gguf

        base = demo.model_path(quiet=True)
        root = cache / "speculative-smollm2"
        root.mkdir(parents=True, exist_ok=True)
        otter = root / "otter-q8_0.gguf"
        if not otter.exists():
            convert(demo.ADAPTER_DIR, base, otter, outtype="q8_0", progress=False)
        cfg = json.loads((demo.ADAPTER_DIR / "otter_config.json").read_text())  # the demo's side shape
        tok = root / "otter-token-q8_0.gguf"
        if not tok.exists():
            b = inspect_gguf(base)["base"]
            shape = dict(name="smollm2", arch=b["architecture"], d=b["embedding_length"], L=b["block_count"],
                         h=b["head_count"], h_kv=b["head_count_kv"], hd=b["key_length"], f=b["feed_forward_length"],
                         V=b["vocab_size"], base_model="SmolLM2-135M-Instruct")
            side = dict(d2=cfg["otter_hidden_size"], h2=cfg["otter_num_attention_heads"],
                        h2_kv=cfg["otter_num_key_value_heads"], f2=cfg["otter_intermediate_size"])
            write_random_adapter(root / "adapter-token", shape, side, "token_reward")
            convert(root / "adapter-token", base, tok, outtype="q8_0", progress=False)
        return base, otter, tok, _train_expert(base, root, cfg)
    from otter_gguf.tools.bench import prepare_random

    ms = prepare_random(name, "q4_k_m", cache, token_head=True, reward_model=False)
    return ms.base, ms.otter, ms.otter_token, None


def _run(llm, draft, n: int, guidance=None, bias=None):
    """(decode tokens/s, completion tokens, kept drafts, proposed drafts) of one greedy completion, streamed:
    decode time from the first chunk to the last (the prompt's decode and the first sample before it)."""
    llm.draft_model = draft
    kw = {} if guidance is None else {"guidance": guidance}
    if bias:
        kw["logit_bias"] = bias
    if draft is not None:
        draft.calls = []
    llm.reset()
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    first = None
    for ch in llm.create_completion(PROMPT, max_tokens=n, temperature=0, stream=True, **kw):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    final = llm.input_ids[: min(llm.n_tokens, n_prompt + n)].tolist()  # (drafts past the end are not tokens)
    got = min(n, len(final) - n_prompt + (0 if hasattr(llm, "has_otter") else 1))  # the base never feeds its last
    kept, proposed = draft.acceptance(final) if draft is not None else (0, 0)
    return (got - 1) / max(end - first, 1e-9), got, kept, proposed


def bench_model(name: str, cache: Path, repeats: int, n: int, draft_n: int, threads: int,
                weights=(1.0,)) -> dict:
    import llama_cpp

    from otter_gguf import OtterLlama

    base, otter, tok, expert = _models(name, cache)
    kw = dict(n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    draft = CountingLookup(draft_n)
    # logits_all in every context (what a draft model needs), so with and without drafts differ only in drafting
    llms = {"base": llama_cpp.Llama(str(base), logits_all=True, **kw),
            "otter": OtterLlama(str(otter), draft_model=draft, **kw),
            "guided": OtterLlama(str(tok), draft_model=draft, **kw)}
    guides = {("guided" if w == weights[0] else f"guided-w{w:g}"): {"weight": w, "top_k": 10} for w in weights}
    if expert is not None:
        llms["expert"] = OtterLlama(str(expert), draft_model=draft, **kw)
        guides["expert"] = {"weight": weights[0], "top_k": 10}
    # the random 1B's byte tokens (ids 3..258 of write_random_base's vocabulary) are kept out: a text ending
    # inside a UTF-8 character makes llama-cpp-python generate past max_tokens (up to the end of the context)
    bias = {i: -100.0 for i in range(3, 259)} if name != "smollm2" else None
    names = ["base", "base+pl", "otter", "otter+pl"] + [x for gname in guides for x in (gname, gname + "+pl")]
    configs = [(c, llms[c.split("+")[0].split("-")[0]], c.endswith("+pl")) for c in names]
    g_of = {c: guides.get(c.split("+")[0]) for c in names}
    runs = {c: [] for c, _, _ in configs}
    for c, llm, pl in configs:  # warm-up
        _run(llm, draft if pl else None, 8, g_of[c], bias)
    for r in range(repeats):
        for c, llm, pl in configs:
            runs[c].append(_run(llm, draft if pl else None, n, g_of[c], bias))
    out = {}
    for c, rs in runs.items():
        kept, prop = sum(x[2] for x in rs), sum(x[3] for x in rs)
        out[c] = {"decode_tok_s": statistics.median(x[0] for x in rs), "tokens": rs[0][1],
                  "acceptance": (kept / prop) if prop else None, "runs": [x[0] for x in rs]}
    for a in ["base", "otter", *guides]:
        out[a + "+pl"]["speedup"] = out[a + "+pl"]["decode_tok_s"] / out[a]["decode_tok_s"]
    out["guidance"] = guides
    out["targets"] = {
        "otter_speedup_over_base_speedup": out["otter+pl"]["speedup"] / out["base+pl"]["speedup"],
        "guided_speedup": {gname: out[gname + "+pl"]["speedup"] for gname in guides}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", action="append", default=None, help="smollm2 (default), 1b; repeatable")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-decode", type=int, default=64)
    ap.add_argument("--draft", type=int, default=8, help="prompt lookup's num_pred_tokens")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--guidance-weights", default="1.0,0.3",
                    help="ARGS weights of the guided configurations (the first is 'guided')")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from otter_gguf.tools.bench import DEFAULT_CACHE

    cache = a.cache_dir or Path(DEFAULT_CACHE)
    report = {"prompt": PROMPT, "repeats": a.repeats, "n_decode": a.n_decode, "draft": a.draft,
              "threads": a.threads, "models": {}}
    for m in a.models or ["smollm2"]:
        weights = tuple(float(w) for w in a.guidance_weights.split(","))
        r = bench_model(m, cache, a.repeats, a.n_decode, a.draft, a.threads, weights)
        report["models"][m] = r
        print(f"\n{m}: decode tok/s (median of {a.repeats}), speed-up, acceptance")
        for c in [k for k in r if k not in ("targets", "guidance")]:
            x = r[c]
            sp = f"  x{x['speedup']:.2f}" if "speedup" in x else ""
            acc = f"  acceptance {x['acceptance']:.0%}" if x["acceptance"] is not None else ""
            print(f"  {c:10s} {x['decode_tok_s']:7.2f}{sp}{acc}  ({x['tokens']} tokens)")
        t = r["targets"]
        gs = ", ".join(f"{k} (weight {r['guidance'][k]['weight']:g}) x{v:.2f}" for k, v in t["guided_speedup"].items())
        print(f"  Otter speed-up / base speed-up: {t['otter_speedup_over_base_speedup']:.3f} (target >= 0.95); "
              f"guided speed-up: {gs} (target >= 1.3)")
        sys.stdout.flush()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
