"""The training data of the SmolLM2 demo head: the synthetic review corpus as chat turns.

    python -m otter_gguf.demo.smollm2.data OUT.jsonl [--n N] [--seed S]

Each record is a user request for a short review and an assistant reply made
of 1-3 sentences of the demo corpus (:mod:`otter_gguf.demo.corpus`, written
as ordinary prose), with per-character sentiment spans over the reply
(``otter-gguf train``'s token-regression format, ``messages`` + ``spans``):
every word, up to the next word, carries the running mean polarity of its
sentence so far (+1 positive .. -1 negative, 0 before the first sentiment
word), the label :func:`otter_gguf.demo.corpus.word_labels` defines.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from otter_gguf.demo import corpus

THINGS = ["a restaurant", "a hotel", "a movie", "a concert", "a museum", "a coffee shop", "a book",
          "a train trip", "a beach holiday", "a bakery"]
REQUESTS = ["Write a short review of {x}.", "Write a one-paragraph review of {x}.",
            "Give me a short review of {x}.", "Review {x} you visited recently.",
            "Write a brief customer review of {x}.", "What did you think of {x}? Answer in a few sentences."]


def prose(doc: str) -> str:
    """``"the food was great . we found ..."`` -> ``"The food was great. We found ..."``."""
    sents = [s.strip() for s in doc.split(" .") if s.strip()]
    return " ".join(s[0].upper() + s[1:] + "." for s in sents)


def spans(text: str) -> list[list]:
    """Contiguous [start, end, target] spans over ``text`` (see the module docstring)."""
    words = corpus.word_labels(text.lower())
    out: list[list] = []
    if words and words[0][0] > 0:
        out.append([0, words[0][0], 0.0])
    for k, (start, _end, label) in enumerate(words):
        end = words[k + 1][0] if k + 1 < len(words) else len(text)
        out.append([start, end, float(label)])
    return out


def record(rng: random.Random, vocab: corpus.Vocabulary = corpus.ALL, requests: list[str] = REQUESTS,
           things: list[str] = THINGS) -> dict:
    reply = prose(corpus.document(rng, vocab))
    ask = rng.choice(requests).format(x=rng.choice(things))
    return {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}],
            "spans": spans(reply)}


def write(out: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps(record(rng)) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m otter_gguf.demo.smollm2.data")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    write(args.out, args.n, args.seed)
    print(f"wrote {args.n} records to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
