"""End-to-end smoke of the real default profile (SmolLM2-135M-Instruct, offline, CPU)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataclasses import replace

from genarm_core import Engine, SamplingOptions, load_config, load_models
from genarm_core.worker import WORKER

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # the real SmolLM2: CI runs these as their own step (.ci/run)


@pytest.fixture(scope="module")
def default_engine():
    """The default profile with its ARMs, in float32 (a profile may ask for bfloat16, whose rounding
    differs between any two implementations)."""
    profile = load_config().profile()
    return Engine(load_models(replace(profile, dtype="float32")))


def test_default_profile_greedy_equals_transformers_generate(default_engine):
    engine = default_engine
    result = engine.generate("Name one fruit.", {}, SamplingOptions(temperature=0, max_new_tokens=12))
    assert result.text.strip() and result.token_ids
    ids = torch.tensor([engine.encode("Name one fruit.")], device=engine.models.device)
    with torch.no_grad():
        out = WORKER.call(engine.models.base_model.generate, ids, do_sample=False, max_new_tokens=12)
    assert result.token_ids == out[0, ids.shape[1]:].tolist()


def test_cli_runs_the_default_profile():
    run = subprocess.run([sys.executable, "-m", "genarm_core", "generate", "--prompt", "Say hello.",
                          "--max-new-tokens", "6", "--seed", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_default_profile_loads_with_dtype_auto_on_this_cpu():
    """As the page loads it: dtype auto, forms measured here. It must load and generate on any CPU
    (AVX2 without native bf16 included), and say what it chose and why."""
    engine = Engine(load_models(load_config().profile()))
    r = engine.models.runtime
    assert r.dtype in ("float32", "bfloat16") and "measured products" in r.dtype_note
    if r.dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert "mkldnn" not in r.forms_used and "oneDNN reports no bf16 support" in r.forms
    text = engine.generate("Name one fruit.", {"harmlessness": 2.0}, SamplingOptions(max_new_tokens=8)).text
    assert text.strip()


def test_cli_profiles_load_says_how_the_default_profile_runs_here():
    run = subprocess.run([sys.executable, "-m", "genarm_core", "profiles", "--load"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    for line in ("this machine:", "dtype:", "product forms offered:", "batch invariance:"):
        assert line in run.stdout
