"""The three tasks of the quality eval (docs/EVAL.md, "Quality"), with data the project makes.

* ``sentiment``: the demo's per-token sentiment task (:mod:`otter_gguf.demo.smollm2.data`: chat replies made of
  the demo corpus, every token labelled with the running sentiment of its sentence, ``otter-gguf train``'s
  ``messages`` + ``spans`` format). The held-out split shares no sentence template, sentiment adjective,
  subject or request with training: the words that carry its labels were never seen in training.
  Judge of guided text: VADER (:func:`otter_gguf.demo.smollm2.run.review_label`).
* ``preference``: pairwise preference in TRL's conversational format (``prompt`` / ``chosen`` / ``rejected``
  message lists): a question, a reply that answers it, and a reply that answers a different question of the
  same kind (a true statement about another entity, whose answer differs). Whether a reply answers the question is not a word
  lookup: both replies are equally fluent and true; only their relation to the question differs. Held out:
  entities, question phrasings and answer phrasings that training never uses. Judge of guided text: the rule
  the generator knows (:func:`answers`): the reply states the asked entity's own answer.
* ``correctness``: the same questions, but the rejected reply answers *the question asked*, wrongly: the same
  phrasing about the same entity with another entity's answer ("The capital of Peru is Oslo."). Both replies
  have the same words but one; which is right is knowledge about the entity, which no reward reads off a
  word (every answer is right for some entity and wrong for the others). Held out as ``preference``: the
  entities, their answers' pairings and a phrasing of each kind. Same judge.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from otter_gguf.demo import corpus
from otter_gguf.demo.smollm2 import data as sentiment_data

__all__ = ["TASKS", "Task", "answers", "correctness_records", "plain_prompt", "preference_prompts", "preference_records",
           "sentiment_records", "sentiment_prompts", "sentiment_vocab", "write_split"]


# -- sentiment ---------------------------------------------------------------------------------------------
def _half(xs: Sequence[str], heldout: bool) -> tuple[str, ...]:
    k = (len(xs) * 2 + 2) // 3  # two thirds train, the rest held out
    return tuple(xs[k:] if heldout else xs[:k])


def sentiment_vocab(heldout: bool) -> corpus.Vocabulary:
    return corpus.Vocabulary(positive=_half(corpus.POSITIVE, heldout), negative=_half(corpus.NEGATIVE, heldout),
                             subjects=_half(corpus.SUBJECTS, heldout), templates=_half(corpus.TEMPLATES, heldout))


def sentiment_records(n: int, seed: int, heldout: bool, chat: bool = True) -> list[dict]:
    """``chat=False`` (a base without a chat template): the replies alone, as ``text`` records."""
    rng = random.Random(seed)
    vocab = sentiment_vocab(heldout)
    req, things = list(_half(sentiment_data.REQUESTS, heldout)), list(_half(sentiment_data.THINGS, heldout))
    recs = [sentiment_data.record(rng, vocab, req, things) for _ in range(n)]
    return recs if chat else [{"text": r["messages"][-1]["content"], "spans": r["spans"]} for r in recs]


def sentiment_prompts(n: int) -> list[tuple[str, str]]:
    """(held-out request, opener) of the guided runs: the reply is started with one of the demo's openers."""
    from otter_gguf.demo.smollm2.run import OPENERS

    reqs, things = _half(sentiment_data.REQUESTS, True), _half(sentiment_data.THINGS, True)
    return [(reqs[i % len(reqs)].format(x=things[i % len(things)]), OPENERS[i % len(OPENERS)]) for i in range(n)]


# -- preference --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kind:
    facts: tuple[tuple[str, str], ...]        # (entity, answer)
    questions: tuple[str, ...]                # "{e}"
    replies: tuple[str, ...]                  # "{e}", "{a}"


_KINDS = (
    _Kind((("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
           ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Greece", "Athens"),
           ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Cuba", "Havana"),
           ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Chile", "Santiago"),
           ("Russia", "Moscow"), ("China", "Beijing"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
           ("Turkey", "Ankara"), ("Argentina", "Buenos Aires")),
          ("What is the capital of {e}?", "Which city is the capital of {e}?", "Tell me the capital of {e}."),
          ("The capital of {e} is {a}.", "{a} is the capital of {e}.", "{e}'s capital city is {a}.")),
    _Kind((("a banana", "yellow"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a tomato", "red"),
           ("chocolate", "brown"), ("a flamingo", "pink"), ("the clear sky", "blue"), ("a lemon", "yellow"),
           ("a crow", "black"), ("milk", "white"), ("a strawberry", "red"), ("a lime", "green"),
           ("a carrot", "orange"), ("a pumpkin", "orange")),
          ("What color is {e}?", "Which colour does {e} have?", "Tell me the color of {e}."),
          ("{e} is {a}.", "The color of {e} is {a}.", "Usually {e} is {a} in color.")),
    _Kind((("a spider", "eight"), ("a dog", "four"), ("a chicken", "two"), ("an ant", "six"), ("a horse", "four"),
           ("a duck", "two"), ("a beetle", "six"), ("a cat", "four"), ("a scorpion", "eight"), ("an ostrich", "two"),
           ("a bee", "six"), ("a cow", "four")),
          ("How many legs does {e} have?", "How many legs has {e} got?", "Tell me how many legs {e} has."),
          ("{e} has {a} legs.", "The number of legs of {e} is {a}.", "{e} walks on {a} legs.")),
    _Kind((("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
           ("early", "late"), ("open", "closed"), ("full", "empty"), ("young", "old"), ("wet", "dry"),
           ("loud", "quiet")),
          ("What is the opposite of {e}?", "Which word means the opposite of {e}?", "Tell me the opposite of {e}."),
          ("The opposite of {e} is {a}.", "{a} is the opposite of {e}.", "{e} and {a} are opposites.")),
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _split_kind(k: _Kind, heldout: bool) -> tuple[list, list, list]:
    facts = list(_half(k.facts, heldout))
    # phrasings: the first two of each kind train, the third is held out
    qs = list(k.questions[2:] if heldout else k.questions[:2])
    rs = list(k.replies[2:] if heldout else k.replies[:2])
    return facts, qs, rs


def plain_prompt(question: str) -> str:
    """The prompt of a preference record for a base without a chat template."""
    return f"Q: {question}\nA: "


def preference_records(n: int, seed: int, heldout: bool, chat: bool = True,
                       rejected: str = "other_question") -> list[dict]:
    """``chat=False`` (a base without a chat template): ``prompt`` / ``chosen`` / ``rejected`` strings.
    ``rejected``: ``"other_question"`` (a true reply about another entity: ``preference``) or ``"wrong_answer"``
    (the asked entity with another entity's answer: ``correctness``)."""
    if rejected not in ("other_question", "wrong_answer"):
        raise ValueError(f"rejected={rejected!r}: expected 'other_question' or 'wrong_answer'")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(_KINDS)
        facts, qs, rs = _split_kind(kind, heldout)
        e, a = rng.choice(facts)
        e2, a2 = rng.choice([f for f in facts if f[1] != a])  # another entity, whose answer is another
        if rejected == "wrong_answer":
            e2 = e
        q = _cap(rng.choice(qs).format(e=e))
        reply = rng.choice(rs)
        good, bad = _cap(reply.format(e=e, a=a)), _cap(reply.format(e=e2, a=a2))
        if chat:
            out.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}]})
        else:
            out.append({"prompt": plain_prompt(q), "chosen": good, "rejected": bad})
    return out


def correctness_records(n: int, seed: int, heldout: bool, chat: bool = True) -> list[dict]:
    """The ``correctness`` task's records: :func:`preference_records` with wrong answers as the rejected replies."""
    return preference_records(n, seed, heldout, chat, rejected="wrong_answer")


def preference_prompts(heldout: bool = True) -> list[tuple[str, str, str]]:
    """(question, entity, answer) of every held-out fact, in its first held-out phrasing: the guided runs."""
    out = []
    for kind in _KINDS:
        facts, qs, _ = _split_kind(kind, heldout)
        out += [(_cap(qs[0].format(e=e)), e, a) for e, a in facts]
    return out


def answers(reply: str, entity: str, answer: str) -> bool:
    """The judge of the preference task: the reply states the asked entity's own answer (a whole word,
    any case)."""
    return re.search(rf"\b{re.escape(answer.lower())}\b", reply.lower()) is not None


# -- the registry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    objective: str          # otter-gguf train's objective of its data
    metric: str             # the held-out ranking metric: "pearson" (per token) or "accuracy" (pairwise)
    records: Callable[..., list[dict]]     # (n, seed, heldout, chat) -> records
    lr: float               # the learning rate of every model of the task (1e-3 made an Otter head's pairwise
                            # loss NaN at step 38 on SmolLM2)


TASKS = {
    "sentiment": Task("sentiment", "token_regression", "pearson", sentiment_records, 1e-3),
    "preference": Task("preference", "pairwise", "accuracy", preference_records, 3e-4),
    "correctness": Task("correctness", "pairwise", "accuracy", correctness_records, 3e-4),
}


def write_split(task: Task, out_dir: Path, n_train: int, n_heldout: int, seed: int,
                chat: bool = True) -> tuple[Path, Path]:
    """``<task>-train.jsonl`` and ``<task>-heldout.jsonl`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, held, s in (("train", n_train, False, seed), ("heldout", n_heldout, True, seed + 1)):
        p = out_dir / f"{task.name}-{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in task.records(n, s, held, chat)), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]
