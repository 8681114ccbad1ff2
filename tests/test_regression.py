"""Quantization regression suite on the demo model (docs/EVAL.md).

Runs ``otter-gguf eval`` on otter_gguf/demo (base + sentiment adapter)
for f16, q8_0, q6_k, q5_k_m, q4_k_m and q4_0 with the default prompt set and
compares the report with the committed baseline
(tests/baselines/demo_eval_baseline.json) within
``REGRESSION_TOLERANCES`` (tests/eval_regression.py); it also enforces the absolute
targets ``TARGETS`` (tests/eval_regression.py). A failure prints the measured table next
to the baseline's.

Regenerate the baseline after an intended change (and say why in the commit):

    OTTER_UPDATE_BASELINE=1 pytest tests/test_regression.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from helpers import keep_eval_report

from otter_gguf.demo import DEMO_DIR
from otter_gguf.tools import eval as ev

import eval_regression as reg

pytestmark = pytest.mark.slow

DEMO = DEMO_DIR
BASELINE = Path(__file__).resolve().parent / "baselines" / "demo_eval_baseline.json"
TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, otter_runtime):
    base, adapter = DEMO / "base", DEMO / "adapter"
    if not (base / "config.json").is_file() or not (adapter / "otter_config.json").is_file():
        pytest.skip(f"the demo model is not in {DEMO} (base/ and adapter/)")
    from otter_gguf_converter import convert

    work = tmp_path_factory.mktemp("demo-eval")
    model = convert(adapter, base, work / "demo-f32.gguf", outtype="f32", base_outtype="f32", progress=False)
    report = ev.evaluate(model, adapter, base, types=TYPES, threads=1, progress=False)
    ev.write_outputs(report, work / "out")
    # paths of this run are meaningless in the baseline
    report["model"] = "demo-f32.gguf (otter-gguf convert --outtype f32 --base-outtype f32)"
    report["reference"]["gguf"] = report["model"]
    report["adapter"] = "otter_gguf/demo/adapter"
    report["base"] = "otter_gguf/demo/base"
    report["prompts"]["source"] = "otter_gguf/data/eval_prompts.txt"
    report["demo_model_sha256"] = _demo_fingerprint()
    keep_eval_report(report, BASELINE)
    return report


def _demo_fingerprint() -> dict[str, str]:
    out = {}
    for rel in ("base/model.safetensors", "base/config.json", "base/tokenizer.model",
                "adapter/otter_model.safetensors", "adapter/otter_config.json"):
        p = DEMO / rel
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
    return out


def _tables(report: dict, baseline: dict | None) -> str:
    out = "\nmeasured:\n" + ev.format_table(report)
    if baseline is not None:
        out += "\n\nbaseline (" + str(BASELINE.relative_to(BASELINE.parents[2])) + "):\n" + ev.format_table(baseline)
    return out


def test_demo_eval_matches_baseline(demo_report):
    if not BASELINE.is_file():
        pytest.fail(f"no baseline at {BASELINE}; create it with OTTER_UPDATE_BASELINE=1" + _tables(demo_report, None))
    baseline = json.loads(BASELINE.read_text(encoding="utf-8"))
    assert demo_report["prompts"]["sha256"] == baseline["prompts"]["sha256"], \
        "the default prompt set changed: regenerate the baseline (OTTER_UPDATE_BASELINE=1)"
    changed = [k for k, v in demo_report["demo_model_sha256"].items()
               if baseline.get("demo_model_sha256", {}).get(k) != v]
    assert not changed, (f"the demo model changed since the baseline ({', '.join(changed)}): regenerate it "
                         f"(OTTER_UPDATE_BASELINE=1) and check the new numbers" + _tables(demo_report, baseline))
    fails = reg.compare_with_baseline(demo_report, baseline)
    assert not fails, "regression against the baseline:\n  " + "\n  ".join(fails) + _tables(demo_report, baseline)


#: targets the demo model cannot meet, and why (docs/EVAL.md, "Targets"). They stay
#: in reg.TARGETS and are checked by their own strict-xfail test below, which
#: fails (XPASS) as soon as one is met, so that it can be enforced again.
KNOWN_MISSES = {
    ("q8_0", "max_abs_rel"): (
        "q8_0 max |delta| is ~8.6% of sigma (target 1%): intrinsic to the demo model at 8-bit weights, not "
        "the runtime - PyTorch with q8_0-rounded weights and f32 activations gives 8.3% (base only 5.0%, Otter "
        "only 6.4%); the f16 KV cache alone gives 0.7%. Mean 0.55%, p99 2.6%, ranking 99.73% (docs/EVAL.md)"),
}


def _is_known(line: str) -> bool:
    return any(line.startswith(f"{t}: {k} ") for t, k in KNOWN_MISSES)


def test_demo_eval_targets(demo_report):
    fails = [f for f in reg.check_targets(demo_report) if not _is_known(f)]
    assert not fails, "absolute targets missed:\n  " + "\n  ".join(fails) + _tables(demo_report, None)


@pytest.mark.parametrize("type_name,metric", sorted(KNOWN_MISSES))
def test_demo_eval_known_target_misses(demo_report, type_name, metric, request):
    request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[(type_name, metric)]))
    spec = {type_name: {metric: reg.TARGETS[type_name][metric]}}
    fails = reg.check_targets(demo_report, spec)
    assert not fails, "\n".join(fails)
