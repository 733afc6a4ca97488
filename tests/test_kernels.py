"""Product forms and attention forms, what this machine offers, measured plans, and the engine's
batch-invariance contract: checked on whatever CPU runs the tests (CI runs them a second time
with oneDNN and ATen capped at AVX2)."""
import json

import pytest
import torch

from conftest import engine_for
from genarm_core import ModelLoadError, SamplingOptions
from genarm_core import kernels


@pytest.fixture
def fresh_capabilities(monkeypatch):
    """capabilities() decides once per process: a test that changes what the library does starts
    from an empty record, and the real one is put back after it."""
    monkeypatch.setattr(kernels, "_CAPABILITIES", {})


def test_oneDNN_bf16_is_offered_exactly_when_the_library_supports_it():
    caps = kernels.capabilities("cpu", torch.bfloat16)
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ("mkldnn" in caps.forms) == supported
    if not supported:
        assert dict(caps.dropped)["mkldnn"].startswith("oneDNN reports no bf16 support")
        assert "not used: mkldnn" in caps.describe()
    assert {"linear", "wt"} <= set(caps.forms)


def test_a_form_whose_probe_raises_is_dropped_with_one_log_line(fresh_capabilities, monkeypatch, capsys):
    def broken(weight):
        raise RuntimeError("mkldnn_reorder_linear_weight: no kernel for this CPU")

    monkeypatch.setattr(kernels, "pack", broken)
    caps = kernels.capabilities("cpu", torch.float32)
    assert "mkldnn" not in caps.forms and caps.forms[:2] == ("linear", "wt")
    assert "probe failed: RuntimeError: mkldnn_reorder_linear_weight" in dict(caps.dropped)["mkldnn"]
    kernels.capabilities("cpu", torch.float32)  # decided once: no second line
    lines = [line for line in capsys.readouterr().err.splitlines() if "mkldnn" in line]
    assert len(lines) == 1 and "not used for float32" in lines[0]
    plan = kernels.measure_linear(24, 16, torch.float32, "cpu", buckets=(1, 2))
    assert "mkldnn" not in plan.used and plan.used <= set(caps.forms)  # what is dropped is never measured nor used


def test_a_form_with_wrong_numbers_is_dropped(fresh_capabilities, monkeypatch):
    real = kernels.apply_form
    monkeypatch.setattr(kernels, "apply_form",
                        lambda form, x, *a, **k: real(form, x, *a, **k) * (2 if form == "wt" else 1))
    caps = kernels.capabilities("cpu", torch.float32)
    assert "wt" not in caps.forms and "wrong results" in dict(caps.dropped)["wt"]


def test_product_plans_are_cached_per_machine(tmp_path, monkeypatch):
    first = kernels.tune([(24, 16), (16, 24)], (2, 1, 8), torch.float32, "cpu", tmp_path, max_rows=4)
    files = list(tmp_path.glob("plans-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["machine"].startswith("v")
    for plan in first.linear.values():
        assert set(plan.forms) == {1, 2, 3, 4} and plan.used <= set(kernels.forms_for("cpu", torch.float32))
    measured = []
    real = kernels.measure_linear
    monkeypatch.setattr(kernels, "measure_linear", lambda *a, **k: measured.append(a[:2]) or real(*a, **k))
    again = kernels.tune([(24, 16), (40, 16)], (2, 1, 8), torch.float32, "cpu", tmp_path, max_rows=4)
    assert measured == [(40, 16)]  # only the new shape is measured
    assert again.linear[(24, 16)].forms == first.linear[(24, 16)].forms


def test_an_isa_cap_gets_plans_of_its_own(monkeypatch):
    """Plans measured under ONEDNN_MAX_CPU_ISA=AVX2 (or without it) never serve the other case."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = kernels.machine_key("cpu", torch.float32)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert kernels.machine_key("cpu", torch.float32) != plain
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in kernels.machine_key("cpu", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_holds_where_the_tuner_claims_it_else_rounding_bounds_the_rows(dtype):
    """The contract: with an invariant form a row's bits do not depend on the batch's size;
    without one the engine says so, and rows differ by at most two roundings of the same sums."""
    plan = kernels.measure_linear(48, 32, dtype, "cpu", buckets=(1, 2, 3, 8))
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=dtype)
    lin = kernels.Linear(w, None, plan, invariant=True)
    assert lin.invariant == (plan.invariant is not None)
    assert dtype == torch.float32 or plan.invariant is None  # claimed in float32 only (kernels' doc)
    x = torch.randn(8, 1, 32, dtype=dtype)
    alone = [lin(x[i:i + 1]) for i in range(8)]
    for R in (2, 3, 8):
        together = lin(x[:R])
        for i in range(R):
            if lin.invariant:
                assert torch.equal(together[i:i + 1], alone[i])
            else:
                bound = 2 * kernels.rounding_bound(x[i], w)
                assert ((together[i].double() - alone[i][0].double()).abs() <= bound).all()


def test_bfloat16_plans_claim_no_invariance_and_say_why(tmp_path):
    tuning = kernels.tune([(48, 32)], (4, 2, 8), torch.bfloat16, "cpu", tmp_path, max_rows=4)
    assert not tuning.invariant and "not claimed in bfloat16" in tuning.invariance()
    assert kernels.tune([(48, 32)], (4, 2, 8), torch.float32, "cpu", tmp_path, max_rows=4).dtype == torch.float32


@pytest.mark.parametrize("form", ["linear", "wt", "mkldnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_product_form_computes_x_times_w_transposed(form, dtype):
    caps = kernels.capabilities("cpu", dtype)
    if form not in caps.forms:
        pytest.skip(f"{form} is not offered here: {dict(caps.dropped).get(form)}")
    torch.manual_seed(0)
    w, b = torch.randn(40, 24, dtype=dtype), torch.randn(40, dtype=dtype)
    x = torch.randn(3, 2, 24, dtype=dtype)
    packed = kernels.pack(w) if form == "mkldnn" else None
    expected = (x.double() @ w.double().T + b.double())
    out = kernels.apply_form(form, x, w, b, packed)
    assert out.shape == (3, 2, 40) and out.is_contiguous()  # rows, whatever the form
    got = out.double()
    bound = kernels.rounding_bound(x.reshape(-1, 24), w).view(3, 2, 40) + torch.finfo(dtype).eps * b.double().abs()
    assert ((got - expected).abs() <= 2 * bound + 1e-12).all()


@pytest.mark.parametrize("form", ["linear", "wt", "native"])
def test_the_native_step_gives_the_same_tokens_whatever_product_form_was_measured_fastest(tiny, arms_spec, form, monkeypatch):
    """The tuner picks forms per CPU ('wt' won on an AVX2 EPYC); the native layer step must give
    the same tokens with any of them. Forced here so every CPU runs each."""
    if form not in kernels.capabilities("cpu", torch.float32).forms:
        pytest.skip(f"{form} is not offered here")
    opts = SamplingOptions(temperature=0, max_new_tokens=6)
    expected = engine_for(tiny["root"] / "base", arms_spec, engine={"forms": "plain"}).generate("Hi.", {"help": 1}, opts)
    monkeypatch.setattr(kernels.Plan, "form", lambda self, rows, invariant=False: form)
    engine = engine_for(tiny["root"] / "base", arms_spec, engine={"batch_invariant": False})
    assert engine.generate("Hi.", {"help": 1}, opts).token_ids == expected.token_ids


def test_attention_forms_agree_with_grouped_query_heads():
    torch.manual_seed(0)
    q = torch.randn(3, 6, 1, 8)
    k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)[:, None, None]
    a, b = kernels.attend("sdpa", q, k, v, mask, 0.3), kernels.attend("manual", q, k, v, mask, 0.3)
    assert torch.allclose(a, b, atol=1e-5)
    # head 4 reads key/value head 1 (= 4 // 3), only the unmasked positions
    w = torch.softmax((q[0, 4, 0] @ k[0, 1, :3].T) * 0.3, -1)
    assert torch.allclose(b[0, 4, 0], w @ v[0, 1, :3], atol=1e-5)


# ---- what the engine reports, and what it does when an optimisation fails ----------------------
def test_the_engine_reports_dtype_forms_and_invariance(tiny):
    models = engine_for(tiny["root"] / "base").models
    r = models.runtime
    assert r.dtype == "float32" and r.invariant == models.batch_invariant == models.backbones[0].invariant
    assert set(r.forms_used) - {"sdpa", "manual", "chunked"} <= set(kernels.forms_for("cpu", torch.float32))
    text = "\n".join(r.lines())
    assert "dtype: float32" in text and f"batch invariance: {'yes' if r.invariant else 'no'}" in text
    off = engine_for(tiny["root"] / "base", engine={"batch_invariant": False}).models.runtime
    assert not off.invariant and "off in the profile" in off.invariance
    plain = engine_for(tiny["root"] / "base", engine={"forms": "plain"}).models.runtime
    assert not plain.invariant and "not claimed" in plain.invariance and plain.forms_used == ("linear", "sdpa")


def test_a_failing_optimisation_falls_back_to_the_plain_path(tiny, arms_spec, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("bf16 path needs the cpu support avx_ne_convert")

    opts = SamplingOptions(temperature=0, max_new_tokens=6)
    expected = engine_for(tiny["root"] / "base", arms_spec, engine={"forms": "plain"}).generate("Hi.", {"help": 1}, opts)
    monkeypatch.setattr(kernels, "tune", broken)
    engine = engine_for(tiny["root"] / "base", arms_spec)
    r = engine.models.runtime
    assert len(r.fallbacks) == 1 and "avx_ne_convert" in r.fallbacks[0] and "plain" in r.fallbacks[0]
    assert r.forms_used == ("linear", "sdpa")
    assert engine.generate("Hi.", {"help": 1}, opts).token_ids == expected.token_ids


def test_any_failure_while_loading_is_a_model_load_error(tiny, monkeypatch, tmp_path, capsys):
    import yaml

    from conftest import profile_dict
    from genarm_core import backbone
    from genarm_core.cli import main

    def broken(self, *args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support")

    monkeypatch.setattr(backbone.Backbone, "__init__", broken)
    with pytest.raises(ModelLoadError, match="profile 'tiny' cannot be loaded: RuntimeError: mkldnn_reorder"):
        engine_for(tiny["root"] / "base")
    f = tmp_path / "models.yaml"
    f.write_text(yaml.safe_dump(profile_dict(tiny["root"] / "base")))
    assert main(["--config", str(f), "generate", "--prompt", "Hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: profile 'tiny' cannot be loaded" in err and "Traceback" not in err


def test_auto_on_a_cpu_never_offers_bfloat16_and_a_profile_may_still_ask_for_it(tiny, monkeypatch):
    """bfloat16's products can measure fastest while its whole steps are slower (README), so `auto`
    measures float32 candidates only; `dtype: bfloat16` in a profile is kept as asked."""
    from genarm_core import models as models_module

    seen = []

    def fake_cpu_mode(shape_sets, attention, trunk, layers, rows, options, max_rows, dtypes, blocks):
        seen.append(list(dtypes))
        return dtypes[0], "dense", "measured"
    monkeypatch.setattr(models_module, "cpu_mode", fake_cpu_mode)
    auto = engine_for(tiny["root"] / "base", dtype="auto")
    assert seen == [[torch.float32]] and auto.models.runtime.dtype == "float32"
    asked = engine_for(tiny["root"] / "base", dtype="bfloat16")
    assert asked.models.runtime.dtype == "bfloat16" and len(seen) == 1  # a fixed dtype is not measured
