"""``otter-gguf eval --quality``: Otter heads against a reward model trained on the same data (docs/EVAL.md).

For each task (:mod:`.tasks`): the train / held-out split is written; an Otter head is trained for every d2
(``otter-gguf train ... --sidecar``: an adapter GGUF beside the base) and the reward-model baseline
(:mod:`.baseline`: the base fine-tuned with a score head, a reward-model GGUF), each in its own process
(training time, and peak RSS from ``wait4``); then, in llama.cpp: the held-out ranking metric, ARGS label
shift judged by the task's independent judge, the extra decode time per token (side by side in one run) and
the extra bytes. ``quality.json`` holds everything, ``quality.md`` the tables (both written at the end;
``work/quality-partial.json`` after each task).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence


from otter_gguf.tools.quality import tasks as T

__all__ = ["QualitySettings", "decode_costs", "format_tables", "machine", "run_quality"]


@dataclass
class QualitySettings:
    tasks: Sequence[str] = ("sentiment", "preference", "correctness")
    d2: Sequence[int] = (32, 64, 128)
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None            # every model's learning rate (None: the task's, tasks.TASKS)
    rm_layers: Sequence[int] = (0, 4)  # one reward model per entry: the top layers it fine-tunes (0: all)
    n_train: int = 800
    n_heldout: int = 120
    seed: int = 1234
    threads: int = 2
    weight: float = 8.0
    top_k: int = 10
    guided_max_tokens: int = 16
    guided_prompts: int = 12


def _run_measured(cmd: list[str], log: Path) -> tuple[str, float, int]:
    """Run ``cmd``; (stdout, wall seconds, peak RSS in bytes of that process)."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {p.returncode}:\n{tail}")
    return out, wall, int(ru.ru_maxrss) * 1024


def _train_otter(base: Path, task: T.Task, train: Path, held: Path, d2: int, s: QualitySettings, work: Path) -> dict:
    adir = work / f"{task.name}-otter-d2_{d2}"
    gguf = work / f"{task.name}-otter-d2_{d2}.gguf"
    cmd = [sys.executable, "-m", "otter_gguf.cli", "train", str(base), str(train), "-o", str(adir),
           "--eval-data", str(held), "--signal-name", task.name, "--d2", str(d2), "--h2", "1", "--h2-kv", "1",
           "--f2", str(d2), "--steps", str(s.steps), "--batch-size", str(s.batch_size), "--lr", str(s.lr or task.lr),
           "--seed", str(s.seed), "-t", str(s.threads), "--gguf", str(gguf), "--sidecar", "--force",
           "--no-progress"]
    _, wall, rss = _run_measured(cmd, work / f"{adir.name}.log")
    rep = json.loads((adir / "train_metrics.json").read_text())
    return {"name": f"otter d2={d2}", "kind": "otter", "d2": d2, "file": str(gguf),
            "train_seconds": rep["train_seconds"], "wall_seconds": round(wall, 1), "peak_rss": rss,
            "torch_heldout": rep["heldout"], "extra_bytes": gguf.stat().st_size}


def _train_rm(base: Path, task: T.Task, train: Path, held: Path, layers: int, s: QualitySettings,
              work: Path) -> dict:
    out = work / f"{task.name}-rm-layers_{layers or 'all'}.gguf"
    cmd = [sys.executable, "-m", "otter_gguf.tools.quality.baseline", str(base), str(train), str(held),
           "-o", str(out), "--steps", str(s.steps), "--batch-size", str(s.batch_size), "--lr", str(s.lr or task.lr),
           "--seed", str(s.seed), "--signal-name", task.name, "-t", str(s.threads)]
    if layers:
        cmd += ["--layers", str(layers)]
    stdout, wall, rss = _run_measured(cmd, work / f"{out.stem}.log")
    rep = json.loads(stdout.strip().splitlines()[-1])
    what = "all layers" if not layers else f"top {layers} layers"
    return {"name": f"reward model ({what} fine-tuned)", "kind": "reward_model",
            "trainable_layers": rep["trainable_layers"], "file": str(out), "train_seconds": rep["train_seconds"],
            "wall_seconds": round(wall, 1), "peak_rss": rss, "torch_heldout": rep["heldout"],
            "extra_bytes": out.stat().st_size}


def _prompts(task: T.Task, tok, s: QualitySettings) -> list[tuple[list[int], Callable[[str], int]]]:
    """(prompt tokens, judge of the continuation) of the guided runs, on held-out requests and questions:
    sentiment: the reply started with one of the demo's openers, judged by VADER (+1 / 0 / -1);
    preference, correctness: a held-out question, judged by the generator's rule (1: the reply states the
    asked entity's answer, 0: it does not)."""
    from otter_gguf.demo.smollm2 import run as demo_run

    out = []
    if task.name == "sentiment":
        for request, opener in T.sentiment_prompts(s.guided_prompts):
            out.append((_prompt_tokens(tok, [{"role": "user", "content": request}], opener),
                        lambda text, o=opener: demo_run.review_label(o + text)))
        return out
    for q, e, a in T.preference_prompts()[: s.guided_prompts]:
        out.append((_prompt_tokens(tok, [{"role": "user", "content": q}], None),
                    lambda text, e=e, a=a: int(T.answers(text, e, a))))
    return out


def _prompt_tokens(tok, msgs: list[dict], opener: str | None) -> list[int]:
    """The request rendered with the base's chat template up to the assistant's turn (+ ``opener``); a base
    without one: the opener alone (sentiment) or :func:`tasks.plain_prompt` (preference)."""
    llm = tok.llm
    if tok.template is None:
        text = opener if opener is not None else T.plain_prompt(msgs[-1]["content"])
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    text = tok.render_chat(msgs, add_generation_prompt=True) + (opener or "")
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def _guided(base: Path, task: T.Task, rows: list[dict], tok, s: QualitySettings) -> dict:
    """The judge's verdicts over the guided runs: unguided (returned), then each scorer's at +weight and -weight
    (``row["guided"]``)."""
    from otter_gguf.runtime.session import Model
    from otter_gguf.tools.quality.scoring import Scorer, args_generate

    prompts = _prompts(task, tok, s)
    bm = Model(base)
    ctx = bm.context(n_ctx=512, n_batch=512, n_threads=s.threads)
    eos = tok.llm.token_eos()

    def stop(out: list[int]) -> bool:
        return out[-1] == eos or (task.name == "sentiment" and "." in tok.llm.detokenize(out[-1:]).decode("utf-8", "replace"))

    def verdicts(scorer, w) -> dict:
        v = []
        for ids, judge in prompts:
            out = args_generate(ctx, scorer, ids, weight=w, top_k=s.top_k, max_tokens=s.guided_max_tokens, stop=stop)
            v.append(judge(tok.llm.detokenize([t for t in out if t != eos]).decode("utf-8", "replace")))
        n = len(v)
        return {"positive": v.count(1) / n, "negative": v.count(-1) / n, "neutral": v.count(0) / n, "n": n}

    res = verdicts(None, 0.0)
    for r in rows:
        sc = Scorer(base, **({"adapter": Path(r["file"])} if r["kind"] == "otter" else
                             {"reward_model": Path(r["file"])}), n_ctx=512, n_seq=s.top_k + 1, threads=s.threads)
        r["guided"] = {f"w={w:+g}": verdicts(sc, w) for w in (s.weight, -s.weight)}
        sc.close()
    ctx.close()
    bm.close()
    return res


def machine(threads: int) -> dict:
    """The bench's machine record, with torch's version and whether the CPU has AVX-512 (the kernels' rounding)."""
    import torch

    from otter_gguf.tools.bench.report import machine_meta

    flags = ""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:  # pragma: no cover - not Linux
        pass
    return {**machine_meta(threads), "torch": torch.__version__, "avx512": " avx512f " in f" {flags} "}


def run_quality(base: Path, out_dir: Path, s: QualitySettings, log: Callable[[str], None] = print) -> dict:
    from otter_gguf.reference.data import load_jsonl
    from otter_gguf.tools.quality.scoring import Scorer, base_likelihood_accuracy, heldout_metrics
    from otter_gguf.tools.train import GGUFTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    tok = GGUFTokenizer(base)
    report = {"base": base.name, "base_bytes": base.stat().st_size, "settings": asdict(s),
              "machine": machine(s.threads), "tasks": {}}
    for name in s.tasks:
        task = T.TASKS[name]
        train, held = T.write_split(task, work, s.n_train, s.n_heldout, s.seed, chat=tok.template is not None)
        rows = []
        for d2 in s.d2:
            log(f"quality {name}: training the Otter head d2={d2}")
            rows.append(_train_otter(base, task, train, held, d2, s, work))
        for layers in s.rm_layers:
            log(f"quality {name}: training the reward model ({layers or 'all'} layers)")
            rows.append(_train_rm(base, task, train, held, layers, s, work))
        examples = load_jsonl(held, tok, objective=task.objective).examples
        for r in rows:
            sc = Scorer(base, **({"adapter": Path(r["file"])} if r["kind"] == "otter" else
                                 {"reward_model": Path(r["file"])}), n_ctx=512, threads=s.threads)
            r["heldout"] = heldout_metrics(sc, task.objective, examples)
            sc.close()
            log(f"quality {name}: {r['name']}: held-out {r['heldout']}")
        log(f"quality {name}: guided decoding (ARGS w=±{s.weight:g}, k={s.top_k})")
        unguided = _guided(base, task, rows, tok, s)
        decode_costs(base, rows, examples[0].tokens)
        report["tasks"][name] = {"objective": task.objective, "metric": task.metric, "lr": s.lr or task.lr,
                                 "unguided": unguided, "rows": rows,
                                 "data": {"train": s.n_train, "heldout": s.n_heldout}}
        if task.objective == "pairwise":  # what the base's own likelihood ranks, untrained
            report["tasks"][name]["base_likelihood"] = base_likelihood_accuracy(base, examples, s.threads)
        _write(out_dir, report, partial=True)  # each task as it completes: work/quality-partial.json
    _write(out_dir, report)
    return report


def _write(out_dir: Path, report: dict, partial: bool = False) -> None:
    """``quality.json`` and ``quality.md`` (written whole, atomically), or with ``partial`` the report so far
    as ``work/quality-partial.json``."""
    from otter_gguf.tools.bench.report import portable

    import copy

    out = copy.deepcopy(report)  # the models' files relative to out_dir (the report travels without them)
    for t in out["tasks"].values():
        for r in t["rows"]:
            r["file"] = os.path.relpath(r["file"], out_dir)
    text = portable(json.dumps(out, indent=2) + "\n")
    if partial:
        (out_dir / "work" / "quality-partial.json").write_text(text)
        return
    from otter_gguf.io.outputs import atomic_outputs

    with atomic_outputs([out_dir / "quality.json", out_dir / "quality.md"], force=True) as (tj, tm):
        tj.write_text(text)
        tm.write_text(format_tables(report))


def decode_costs(base: Path, rows: list[dict], tokens: list[int]) -> None:
    """Each row's extra decode time per token (``row["decode"]``, ``row["extra_ms_per_token"]``), side by side
    in this process: a head against base alone (with the first reward model beside the base in the same
    measurement), a reward model beside the base against base alone (with the first head)."""
    from otter_gguf.tools.quality.scoring import decode_cost

    heads = [r for r in rows if r["kind"] == "otter"]
    rms = [r for r in rows if r["kind"] == "reward_model"]
    for r in rows:
        head, rm = (r, rms[0]) if r["kind"] == "otter" else (heads[0], r)
        r["decode"] = decode_cost(base, adapter=Path(head["file"]), reward_model=Path(rm["file"]), tokens=tokens,
                                  threads=1)
        r["extra_ms_per_token"] = r["decode"]["extra_ms_per_token"]["otter" if r["kind"] == "otter" else
                                                                     "reward_model"]


def _judged(task: str, v: dict) -> str:
    return f"{v['positive']:.0%} pos / {v['negative']:.0%} neg" if task == "sentiment" else f"{v['positive']:.0%}"


def format_tables(report: dict) -> str:
    """One markdown table per task."""
    s = report["settings"]
    w = s["weight"]
    lines = []
    for name, t in report["tasks"].items():
        m = t["metric"]
        judge = ("VADER: share of positive / negative sentences" if name == "sentiment" else
                 "the generator's rule: share of replies that state the asked entity's answer")
        lines += [f"### {name}: held-out {m}; ARGS greedy, k={s['top_k']}, judged by {judge}", "",
                  f"| model | held-out {m} | guided w={w:+g} | guided w={-w:+g} | extra ms/token | extra MiB | "
                  f"train s | train peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
        u = _judged(name, t["unguided"])
        bl = t.get("base_likelihood", {}).get(m)
        base_row = "| base, unguided | |" if bl is None else f"| base, unguided (its log-likelihood ranks) | {bl:.3f} |"
        lines.append(f"{base_row} {u} | {u} | 0 | 0 | | |")
        for r in t["rows"]:
            g, ms = r["guided"], r["extra_ms_per_token"]
            lines.append(f"| {r['name']} | {r['heldout'][m]:.3f} | {_judged(name, g[f'w={w:+g}'])} | "
                         f"{_judged(name, g[f'w={-w:+g}'])} | {ms:.2f} | {r['extra_bytes'] / 2**20:.2f} | "
                         f"{r['train_seconds']:.0f} | {r['peak_rss'] / 2**20:.0f} |")
        lines.append("")
    return "\n".join(lines)
