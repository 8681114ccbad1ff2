"""`make demo` (``python -m otter_gguf.demo``).

The embedded default is SmolLM2-135M-Instruct with an Otter sentiment head
(:mod:`otter_gguf.demo.smollm2.run`). ``--tiny`` runs the demo of the tiny
synthetic model in `otter_gguf/demo/` instead (the fast tests' model): a small
`llama` base LM trained on synthetic reviews plus an Otter head trained to
read the sentiment of the text so far (one signal, "sentiment", about +1 for
positive and -1 for negative). That demo

1. converts adapter + base to one GGUF at q8_0 and at q4_k_m and inspects it,
2. runs one prompt unguided and reward-guided, printing every token's reward,
3. generates a batch of reviews unguided and guided at both quant types and
   prints the share of positive sentences (the true label, decided from the
   words by `otter_gguf.demo.corpus`), i.e. the label shift guidance causes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from otter_gguf.demo import DEMO_DIR

PROMPT = "the food was"
BATCH_PROMPTS = ["the food was", "i think the movie is", "the staff was", "we found the room",
                 "anna said the coffee was", "after lunch the weather seemed",
                 "the hotel was", "in the end the concert was"]


def _colour(v: float) -> str:
    """ANSI colour for a reward in [-1, 1]: red (negative) .. green (positive)."""
    if not sys.stdout.isatty():
        return ""
    return "\x1b[32m" if v > 0.33 else "\x1b[31m" if v < -0.33 else "\x1b[33m"


def _show(title: str, result: dict) -> None:
    otter = result["choices"][0]["otter"]
    reset = "\x1b[0m" if sys.stdout.isatty() else ""
    print(f"  {title}: {PROMPT!r} + {result['choices'][0]['text']!r}")
    for text, sig in zip(otter["token_texts"], otter["signals"]):
        v = sig[0]
        print(f"    {text!r:<14} {_colour(v)}{v:+.3f}{reset}")


def _label_share(llm, guidance, n_per_prompt: int, max_tokens: int) -> tuple[float, int]:
    from otter_gguf.demo.corpus import sentence_labels

    labels: list[int] = []
    for i, prompt in enumerate(BATCH_PROMPTS):
        for j in range(n_per_prompt):
            out = llm(prompt, max_tokens=max_tokens, temperature=0.8, seed=1000 * i + j,
                      stop=["."], guidance=guidance)
            text = prompt + out["choices"][0]["text"] + " ."
            labels.extend(sentence_labels(text)[:1])
    labels_arr = np.array(labels)
    return float(np.mean(labels_arr > 0)), len(labels_arr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tiny" in argv:
        return tiny_main([a for a in argv if a != "--tiny"])
    from otter_gguf.demo.smollm2.run import main as smollm2_main

    return smollm2_main(argv)


def tiny_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m otter_gguf.demo --tiny")
    ap.add_argument("--work", type=Path, default=Path("build/demo"), help="working directory")
    ap.add_argument("--types", default="q8_0,q4_k_m")
    ap.add_argument("--weight", type=float, default=4.0, help="guidance weight")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--samples", type=int, default=6, help="generations per batch prompt")
    args = ap.parse_args(argv)

    from otter_gguf import Guidance, OtterLlama
    from otter_gguf_converter import convert, inspect_gguf
    from otter_gguf_converter.inspect import format_report

    base, adapter = DEMO_DIR / "base", DEMO_DIR / "adapter"
    args.work.mkdir(parents=True, exist_ok=True)
    guidance = Guidance(weight=args.weight, top_k=args.top_k, signal="sentiment")
    print("otter-gguf demo: a small llama base LM + an Otter sentiment head "
          f"(adapter: {adapter.relative_to(DEMO_DIR.parent.parent)})\n")
    shifts = []
    for i, qtype in enumerate(args.types.split(",")):
        gguf = args.work / f"demo-otter-{qtype}.gguf"
        convert(adapter, base, gguf, outtype=qtype, base_outtype=qtype, progress=False, force=True)
        print(f"== {qtype}: {gguf}")
        if i == 0:
            print(format_report(inspect_gguf(gguf)))
        llm = OtterLlama(str(gguf), n_ctx=512, n_threads=2, verbose=False, n_seq_max=args.top_k + 1)
        _show("unguided", llm(PROMPT, max_tokens=12, temperature=0, stop=["."]))
        _show(f"guided (ARGS, w={args.weight}, k={args.top_k})",
              llm(PROMPT, max_tokens=12, temperature=0, stop=["."], guidance=guidance))
        t0 = time.time()
        plain, n = _label_share(llm, None, args.samples, 16)
        steered, _ = _label_share(llm, guidance, args.samples, 16)
        shifts.append((qtype, plain, steered, n, time.time() - t0))
        print()
    print("Label shift: share of positive sentences over "
          f"{shifts[0][3]} sampled generations (temperature 0.8, same seeds)")
    print(f"  {'type':<8} {'unguided':>9} {'guided':>9} {'shift':>8}")
    for qtype, plain, steered, _n, _t in shifts:
        print(f"  {qtype:<8} {plain:>9.1%} {steered:>9.1%} {steered - plain:>+8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
