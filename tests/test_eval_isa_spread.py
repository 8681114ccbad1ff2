"""The eval regression tolerances cover the spread between CPU kernels.

``tests/baselines/isa/<class>/`` holds the eval reports of the two eval
regression tests (tests/test_train_eval.py, tests/test_regression.py) as run
on one runtime build per ISA class (``runs.json`` says which build, on which
machine, with which command: CONTRIBUTING.md, "Tests that hold on any x86-64-v3
CPU"). ggml's kernels for each class round differently, so the runtime rows of
the reports differ; the committed baselines must hold whichever class made
them and whichever class CI runs on.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import eval_regression as reg

pytestmark = pytest.mark.unit

BASELINES = Path(__file__).resolve().parent / "baselines"
ISA = BASELINES / "isa"
RUNS = json.loads((ISA / "runs.json").read_text(encoding="utf-8"))
REPORTS = ("smollm2_eval_baseline.json", "demo_eval_baseline.json")
#: tolerances are at least this many times the measured spread
MARGIN = 2.0


def _report(cls: str, name: str) -> dict:
    return json.loads((ISA / cls / name).read_text(encoding="utf-8"))


def _same_inputs(a: dict, b: dict) -> list[str]:
    keys = ("head_sha256", "demo_model_sha256")
    out = [k for k in keys if a.get(k) != b.get(k)]
    if a["prompts"]["sha256"] != b["prompts"]["sha256"] or sorted(a["types"]) != sorted(b["types"]):
        out.append("prompts/types")
    return out


def test_every_class_was_measured_with_its_command():
    assert len(RUNS["classes"]) >= 2
    for cls, run in RUNS["classes"].items():
        assert (ISA / cls).is_dir(), cls
        assert run["system_info"].startswith("CPU :") and run["command"] and run["machine"], cls
        # the build really is of its class: AVX-512 in the kernels or not
        assert ("AVX512 = 1" in run["system_info"]) == run["avx512"], cls
    assert {r["avx512"] for r in RUNS["classes"].values()} == {True, False}


@pytest.mark.parametrize("name", REPORTS)
@pytest.mark.parametrize("cls", sorted(RUNS["classes"]))
def test_each_class_passes_the_committed_baseline(cls, name):
    baseline = json.loads((BASELINES / name).read_text(encoding="utf-8"))
    report = _report(cls, name)
    assert not _same_inputs(report, baseline), \
        f"{cls}/{name} was measured on other inputs than the baseline: re-measure the ISA spread (CONTRIBUTING.md)"
    fails = reg.compare_with_baseline(report, baseline)
    assert not fails, f"{cls}:\n" + "\n".join(fails)


@pytest.mark.parametrize("name", REPORTS)
def test_tolerances_are_twice_the_spread_between_classes(name):
    """Any class's report as the baseline, any other's as the run, within half the
    tolerances: a tolerance tightened below twice the measured spread fails here."""
    half = {k: (rel / MARGIN, ab / MARGIN) for k, (rel, ab) in reg.REGRESSION_TOLERANCES.items()}
    fails = []
    for a, b in itertools.permutations(sorted(RUNS["classes"]), 2):
        fails += [f"baseline {a}, run {b}: {f}" for f in reg.compare_with_baseline(_report(b, name), _report(a, name),
                                                                                 tolerances=half)]
    assert not fails, "\n".join(fails)


def test_the_spread_is_real():
    """The classes' runtime rows do differ (a copied report would make the tests above vacuous)."""
    a, b = (_report(c, REPORTS[0]) for c in sorted(RUNS["classes"])[:2])
    diffs = [abs(reg._metrics_of(a["types"][t])[k] - reg._metrics_of(b["types"][t])[k])
             for t in a["types"] for k in ("rank_agreement", "mean_abs_rel")]
    assert max(diffs) > 1e-4
