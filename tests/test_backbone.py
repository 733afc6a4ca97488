"""The backbone runner: shared trunk, batched LoRA, product forms, cache, scoring, each checked
against independent full recomputes (transformers' own forward of the merged adapters)."""
import copy
import json

import pytest
import torch

from conftest import engine_for, make_lora, make_model, merged, save_model
from genarm_core import ModelLoadError, SamplingOptions
from genarm_core.backbone import Cache
from reference import full_logprobs, reference_decode

# float32 engine vs float64 references, in log-prob units. These random 4-layer models have
# log-probs down to -45 and large LoRA deltas: transformers' own float32 forward of the merged
# adapters is off from float64 by up to 2.1e-4 here, the engine by up to 2.3e-4.
TOL, RTOL = 5e-4, 0
PROMPTS = ["Tell me about tea.", "How do I fix a flat bicycle tyre quickly?"]
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tokenizer):
    """A 4-layer Llama and a Qwen2 (attention biases) with adapters of different ranks and
    modules: 'late' and 'mlp' leave layers 0-1 alone, 'mid' starts at layer 2, 'early' adapts layer 0,
    'head' only the output head (the whole model is then a shared trunk)."""
    root = tmp_path_factory.mktemp("deep")
    out = {"root": root}
    for arch in ("llama", "qwen2"):
        base = make_model(tokenizer, arch, seed=5, layers=4)
        save_model(base, tokenizer, root / arch)
        specs = {"late": dict(r=4, targets=ALL_MODULES, layers=[2, 3]),
                 "mlp": dict(r=2, targets=("gate_proj", "up_proj", "down_proj"), layers=[3]),
                 "mid": dict(r=8, targets=("q_proj", "k_proj", "v_proj"), layers=[2]),
                 "early": dict(r=4, targets=("v_proj", "down_proj"), layers=[0, 3]),
                 "head": dict(r=4, targets=("lm_head",))}
        for i, (name, spec) in enumerate(specs.items()):
            make_lora(base, root / f"{arch}-{name}", seed=10 + i, **spec)
        # float64 copies: the references are exact to float64, so TOL bounds the engine's own error
        out[arch] = {"base": base.double(), **{n: merged(base, root / f"{arch}-{n}").double() for n in specs}}
    return out


def deep_engine(deep, arch, names, **engine_options):
    root = deep["root"]
    arms = [{"name": n, "adapter": str(root / f"{arch}-{n}"), "beta": 1.0} for n in names]
    extra = {"engine": engine_options} if engine_options else {}
    return engine_for(root / arch, arms, **extra)


def distributions_match(engine, models, base, steps=4):
    """Prefill two prompts (different lengths) into one cache, step, drop one, step again:
    every row's full distribution equals the model's full recompute."""
    m = engine.models
    seqs = [engine.encode(p) for p in PROMPTS]
    caches = [Cache(bb) for bb in m.backbones]
    outs = [[bb.prefill(ids) for ids in seqs] for bb in m.backbones]
    for cache, o in zip(caches, outs):
        cache.append([e for e, _ in o])
    lp = m.split_rows([torch.cat([torch.log_softmax(lg, -1) for _, lg in o]) for o in outs])
    for step in range(steps):
        if step == steps - 1:  # the first sequence leaves
            for cache in caches:
                cache.keep([1])
            seqs = seqs[1:]
            lp = (lp[0][1:], lp[1][1:])
        for s, ids in enumerate(seqs):
            assert torch.allclose(lp[0][s].double(), full_logprobs(base, ids), atol=TOL, rtol=RTOL)
            for i, model in enumerate(models):
                assert torch.allclose(lp[1][s, i].double(), full_logprobs(model, ids), atol=TOL, rtol=RTOL)
        tokens = torch.tensor([300 + 7 * s + step for s in range(len(seqs))])
        seqs = [ids + [int(t)] for ids, t in zip(seqs, tokens)]
        lp = m.split_rows([torch.log_softmax(bb.step(c, tokens), -1) for bb, c in zip(m.backbones, caches)])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("names,trunk", [(["late"], 2), (["late", "mlp"], 2), (["late", "mlp", "mid"], 2),
                                         (["mlp"], 3), (["early", "late"], 0), (["head"], 4),
                                         (["late", "head"], 2)])
def test_shared_trunk_and_batched_lora_equal_full_recompute(deep, arch, names, trunk):
    engine = deep_engine(deep, arch, names)
    assert engine.models.backbones[0].trunk == trunk
    distributions_match(engine, [deep[arch][n] for n in names], deep[arch]["base"])


@pytest.mark.parametrize("switch", [dict(shared_trunk=False), dict(batched_lora=False), dict(forms="plain")])
def test_each_optimisation_off_gives_the_same_distributions(deep, switch):
    names = ["late", "mlp", "mid"]
    engine = deep_engine(deep, "llama", names, **switch)
    if "shared_trunk" in switch:
        assert engine.models.backbones[0].trunk == 0
    distributions_match(engine, [deep["llama"][n] for n in names], deep["llama"]["base"])


def test_guided_decoding_with_a_shared_trunk_equals_the_reference(deep):
    names = ["late", "mlp", "mid"]
    engine = deep_engine(deep, "qwen2", names)
    weights = (1.5, -0.5, 0.8)
    opts = SamplingOptions(temperature=0.9, top_p=0.8, max_new_tokens=10, seed=4)
    ids = engine.encode(PROMPTS[0])
    ref = reference_decode(deep["qwen2"]["base"], [deep["qwen2"][n] for n in names], weights, ids, 10, 0.9,
                           top_p=0.8, seed=4)
    out = engine.generate(PROMPTS[0], dict(zip(names, weights)), opts)
    assert out.token_ids == [r[0] for r in ref]
    assert out.logprobs_fused == pytest.approx([r[3] for r in ref], abs=TOL, rel=RTOL)


def test_zero_weights_greedy_equals_transformers_generate_with_a_shared_trunk(deep):
    engine = deep_engine(deep, "llama", ["late", "mid"])
    result = engine.generate(PROMPTS[1], {}, SamplingOptions(temperature=0, max_new_tokens=12))
    ids = engine.encode(PROMPTS[1])
    with torch.no_grad():
        out = deep["llama"]["base"].generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                             pad_token_id=2, eos_token_id=2)
    assert result.token_ids == out[0, len(ids):].tolist()


def test_score_with_a_shared_trunk_equals_the_unbatched_sum(deep, tokenizer):
    names = ["late", "mlp"]
    engine = deep_engine(deep, "llama", names)
    prompt, responses = "Say hi.", ["Hi there, friend!", "No.", "A much longer answer than the others."]
    rewards = engine.score(prompt, responses)
    ids = engine.encode(prompt)
    for response, got in zip(responses, rewards):
        resp = tokenizer(response, add_special_tokens=False)["input_ids"] + [2]
        for name in names:
            model = deep["llama"][name]
            expected = sum(float(full_logprobs(model, ids + resp[:t])[resp[t]]) for t in range(len(resp)))
            assert got[name] == pytest.approx(expected, rel=1e-4)


def test_the_hf_model_still_works_after_its_weights_are_fused(deep, tokenizer):
    """The engine fuses q/k/v and gate/up weights and leaves views in the HF modules."""
    engine = deep_engine(deep, "llama", ["late"])
    model = engine.models.base_model
    ids = torch.tensor([engine.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits.double(), deep["llama"]["base"](ids).logits, atol=TOL)


def test_unsupported_adapters_are_refused_with_the_reason(deep, tmp_path):
    folder = tmp_path / "dora"
    make_lora(deep["llama"]["base"], folder, seed=3, use_dora=True)
    with pytest.raises(ModelLoadError, match="ARM 'dora'.*use_dora"):
        engine_for(deep["root"] / "llama", [{"name": "dora", "adapter": str(folder)}])
    folder = tmp_path / "embed"
    make_lora(deep["llama"]["base"], folder, seed=3, targets=("embed_tokens", "q_proj"))
    with pytest.raises(ModelLoadError, match="ARM 'embed'.*embed_tokens"):
        engine_for(deep["root"] / "llama", [{"name": "embed", "adapter": str(folder)}])


def test_unsupported_architecture_is_refused(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    save_model(model, tokenizer, tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported.*llama"):
        engine_for(tmp_path / "gpt2")


def test_product_plans_are_cached_per_machine(tmp_path, monkeypatch):
    from genarm_core import kernels

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


def test_invariant_forms_give_each_row_the_same_bits_at_any_batch_size():
    from genarm_core import kernels

    plan = kernels.measure_linear(48, 32, torch.bfloat16, "cpu", buckets=(1, 2, 3, 8))
    if plan.invariant is None:
        pytest.skip("no batch-invariant bfloat16 form on this CPU")
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    lin = kernels.Linear(w, None, plan, invariant=True)
    x = torch.randn(8, 1, 32, dtype=torch.bfloat16)
    alone = [lin(x[i:i + 1]) for i in range(8)]
    for R in (2, 3, 8):
        together = lin(x[:R])
        assert all(torch.equal(together[i:i + 1], alone[i]) for i in range(R))


@pytest.mark.parametrize("form", ["linear", "wt", "mkldnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_product_form_computes_x_times_w_transposed(form, dtype):
    from genarm_core import kernels

    if form not in kernels.forms_for("cpu", dtype):
        pytest.skip(f"{form} is not available here")
    torch.manual_seed(0)
    w, b = torch.randn(40, 24, dtype=dtype), torch.randn(40, dtype=dtype)
    x = torch.randn(3, 2, 24, dtype=dtype)
    packed = kernels.pack(w) if form == "mkldnn" else None
    expected = (x.double() @ w.double().T + b.double())
    got = kernels.apply_form(form, x, w, b, packed).double()
    assert got.shape == (3, 2, 40)
    assert torch.allclose(got, expected, atol=1e-4 if dtype == torch.float32 else 0.3)


def test_attention_forms_agree_with_grouped_query_heads():
    from genarm_core.kernels import attend

    torch.manual_seed(0)
    q = torch.randn(3, 6, 1, 8)
    k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)[:, None, None]
    a, b = attend("sdpa", q, k, v, mask, 0.3), attend("manual", q, k, v, mask, 0.3)
    assert torch.allclose(a, b, atol=1e-5)
    # head 4 reads key/value head 1 (= 4 // 3), only the unmasked positions
    w = torch.softmax((q[0, 4, 0] @ k[0, 1, :3].T) * 0.3, -1)
    assert torch.allclose(b[0, 4, 0], w @ v[0, 1, :3], atol=1e-5)


def test_weak_to_strong_lora_arms_on_their_own_smaller_backbone(tiny, tmp_path):
    """Two LoRA ARMs on a small backbone (the tiny Qwen2) guide the larger Llama base: they run
    as two rows of one backbone of their own, and equal the merged small models."""
    small_dir = tiny["root"] / "small"
    make_lora(tiny["small"], tmp_path / "s1", seed=21, targets=("q_proj", "down_proj"))
    make_lora(tiny["small"], tmp_path / "s2", seed=22, r=2, targets=ALL_MODULES)
    arms = [{"name": n, "model": {"path": str(small_dir)}, "adapter": str(tmp_path / n), "beta": 1.0} for n in ("s1", "s2")]
    arms.append({"name": "help", "adapter": str(tiny["root"] / "help"), "beta": 0.5})
    engine = engine_for(tiny["root"] / "base", arms)
    assert engine.models.row_names == [["base", "help"], ["s1", "s2"]]
    assert engine.models.backbones[1].M == 2
    double = lambda m: copy.deepcopy(m).double()  # noqa: E731 - the session's models stay float32
    refs = [merged(tiny["small"], tmp_path / "s1").double(), merged(tiny["small"], tmp_path / "s2").double(),
            double(tiny["help"])]
    base = double(tiny["base"])
    distributions_match(engine, refs, base)
    weights = (1.5, -0.7, 0.8)
    ids = engine.encode(PROMPTS[1])
    ref = reference_decode(base, refs, weights, ids, 8, 0.9, seed=2)
    out = engine.generate(PROMPTS[1], dict(zip(["s1", "s2", "help"], weights)),
                          SamplingOptions(temperature=0.9, max_new_tokens=8, seed=2))
    assert out.token_ids == [r[0] for r in ref]
