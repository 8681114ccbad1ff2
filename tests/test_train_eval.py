"""Quantization accuracy of the real demo head (SmolLM2-135M + the committed sentiment head).

Runs ``otter-gguf eval`` with the F32 GGUF of SmolLM2's own (Q4_1) weights as MODEL.gguf
and as --base (the PyTorch reference on those weights), for f16, q8_0, q6_k and q4_k_m,
and compares with the committed baseline (tests/baselines/smollm2_eval_baseline.json)
within ``REGRESSION_TOLERANCES``, plus the absolute targets below. Measured numbers and the
command: docs/EVAL.md ("The real model"). Regenerate after an intended change:

    OTTER_UPDATE_BASELINE=1 pytest tests/test_train_eval.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from helpers import keep_eval_report

from otter_gguf.demo import smollm2 as demo
from otter_gguf.tools import eval as ev

import eval_regression as reg

pytestmark = pytest.mark.slow

BASELINE = Path(__file__).resolve().parent / "baselines" / "smollm2_eval_baseline.json"
TYPES = ("f16", "q8_0", "q6_k", "q4_k_m")

#: absolute targets for the real head (worst signal; the baseline run measured, in order:
#: f16 0.06% / 99.9% / 5e-6, q8_0 2.3% / 98.9% / 5e-3, q4_k_m 6.3% / 96.5% / 5e-2)
TARGETS = {
    "f16": {"mean_abs_rel": ("<=", 0.002), "rank_agreement": (">=", 0.995), "kld_mean": ("<=", 1e-4)},
    "q8_0": {"mean_abs_rel": ("<=", 0.035), "rank_agreement": (">=", 0.98), "kld_mean": ("<=", 0.01)},
    "q6_k": {"mean_abs_rel": ("<=", 0.055), "rank_agreement": (">=", 0.975)},
    "q4_k_m": {"mean_abs_rel": ("<=", 0.09), "rank_agreement": (">=", 0.95), "kld_mean": ("<=", 0.08)},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory, otter_runtime):
    from otter_gguf.reference.gguf_base import dequantize_gguf

    work = tmp_path_factory.mktemp("smollm2-eval")
    f32 = dequantize_gguf(demo.model_path(quiet=True), work / "smollm2-f32.gguf")
    rep = ev.evaluate(f32, demo.ADAPTER_DIR, f32, types=TYPES, threads=2, progress=False)
    rep["model"] = rep["base"] = rep["reference"]["gguf"] = \
        "SmolLM2-135M-Instruct.Q4_1.gguf dequantized to F32 (dequantize_gguf)"
    rep["adapter"] = "otter_gguf/demo/smollm2/adapter"
    rep["prompts"]["source"] = "otter_gguf/data/eval_prompts.txt"
    rep["head_sha256"] = hashlib.sha256((demo.ADAPTER_DIR / "otter_model.safetensors").read_bytes()).hexdigest()
    keep_eval_report(rep, BASELINE)
    return rep


def test_real_head_meets_its_targets(report):
    fails = reg.check_targets(report, TARGETS)
    assert not fails, "\n".join(fails) + "\n" + ev.format_table(report)


def test_real_head_matches_the_baseline(report):
    baseline = json.loads(BASELINE.read_text())
    assert report["head_sha256"] == baseline["head_sha256"], "the demo head changed: regenerate the baseline"
    fails = reg.compare_with_baseline(report, baseline)
    assert not fails, "\n".join(fails) + "\nmeasured:\n" + ev.format_table(report) + \
        "\nbaseline:\n" + ev.format_table(baseline)


def test_intrinsic_error_is_part_of_the_runtime_error(report):
    """Weight rounding alone (PyTorch on each GGUF's dequantized weights) never exceeds what
    the runtime shows by more than noise, and grows as the types get smaller."""
    intr = [report["types"][t]["intrinsic"]["worst"]["mean_abs_rel"] for t in TYPES]
    assert intr == sorted(intr)
    for t in TYPES:
        r = report["types"][t]
        assert r["intrinsic"]["worst"]["mean_abs_rel"] <= 1.1 * r["worst"]["mean_abs_rel"]
