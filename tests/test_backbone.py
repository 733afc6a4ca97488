"""The backbone runner: shared trunk, batched LoRA, product forms, cache, scoring, each checked
against independent full recomputes (transformers' own forward of the merged adapters)."""
import copy
import json

import pytest
import torch

from conftest import engine_for, make_lora, make_model, merged, save_model
from genarm_core import ModelLoadError, SamplingOptions
from genarm_core.backbone import Cache
from reference import ERROR_MULTIPLE, Float32Budget, float32_error, full_logprobs, reference_decode

# The engine's float32 error against float64 is bounded by a multiple of transformers' own float32
# error on the same inputs (reference.Float32Budget). These random 4-layer models have log-probs
# down to -45 and large LoRA deltas, so both errors are near 1e-4 and vary with the CPU's kernels.
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
        # (float32, float64) of each: float64 is the exact reference, float32 transformers' own error
        models = {"base": base, **{n: merged(base, root / f"{arch}-{n}") for n in specs}}
        out[arch] = {n: (m, copy.deepcopy(m).double()) for n, m in models.items()}
    return out


def deep_engine(deep, arch, names, **engine_options):
    root = deep["root"]
    arms = [{"name": n, "adapter": str(root / f"{arch}-{n}"), "beta": 1.0} for n in names]
    extra = {"engine": engine_options} if engine_options else {}
    return engine_for(root / arch, arms, **extra)


def distributions_match(engine, models, base, steps=4):
    """Prefill two prompts (different lengths) into one cache, step, drop one, step again:
    every row's full distribution equals the model's full recompute (models, base: (float32,
    float64) pairs; the engine's error is bounded by transformers' own float32 error)."""
    budget = Float32Budget()
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
            budget.add(lp[0][s], *base, ids)
            for i, model in enumerate(models):
                budget.add(lp[1][s, i], *model, ids)
        tokens = torch.tensor([300 + 7 * s + step for s in range(len(seqs))])
        seqs = [ids + [int(t)] for ids, t in zip(seqs, tokens)]
        lp = m.split_rows([torch.log_softmax(bb.step(c, tokens), -1) for bb, c in zip(m.backbones, caches)])
    budget.check()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("names,trunk", [(["late"], 2), (["late", "mlp"], 2), (["late", "mlp", "mid"], 2),
                                         (["mlp"], 3), (["early", "late"], 0), (["head"], 4),
                                         (["late", "head"], 2)])
def test_shared_trunk_and_batched_lora_equal_full_recompute(deep, arch, names, trunk):
    engine = deep_engine(deep, arch, names)
    assert engine.models.backbones[0].trunk == trunk
    distributions_match(engine, [deep[arch][n] for n in names], deep[arch]["base"])


@pytest.mark.parametrize("switch", [dict(shared_trunk=False), dict(batched_lora=False), dict(forms="plain"),
                                    dict(native_step=False)])
def test_each_optimisation_off_gives_the_same_distributions(deep, switch):
    names = ["late", "mlp", "mid"]
    engine = deep_engine(deep, "llama", names, **switch)
    if "shared_trunk" in switch:
        assert engine.models.backbones[0].trunk == 0
    if "native_step" in switch or "forms" in switch:
        assert engine.models.backbones[0].native is None  # the torch path of every layer
    distributions_match(engine, [deep["llama"][n] for n in names], deep["llama"]["base"])


def test_guided_decoding_with_a_shared_trunk_equals_the_reference(deep):
    names = ["late", "mlp", "mid"]
    engine = deep_engine(deep, "qwen2", names)
    weights = (1.5, -0.5, 0.8)
    opts = SamplingOptions(temperature=0.9, top_p=0.8, max_new_tokens=10, seed=4)
    ids = engine.encode(PROMPTS[0])
    models = [deep["qwen2"][n] for n in ["base", *names]]
    ref = reference_decode(models[0][1], [m[1] for m in models[1:]], weights, ids, 10, 0.9, top_p=0.8, seed=4)
    out = engine.generate(PROMPTS[0], dict(zip(names, weights)), opts)
    assert out.token_ids == [r[0] for r in ref]
    # the fused log-prob sums 1 + sum |w| models' log-probs, each within the float32 budget
    tol = ERROR_MULTIPLE * (1 + sum(map(abs, weights))) * float32_error(models, [(ids + out.token_ids, len(ids))])
    assert out.logprobs_fused == pytest.approx([r[3] for r in ref], abs=tol, rel=0)


def test_zero_weights_greedy_equals_transformers_generate_with_a_shared_trunk(deep):
    engine = deep_engine(deep, "llama", ["late", "mid"])
    result = engine.generate(PROMPTS[1], {}, SamplingOptions(temperature=0, max_new_tokens=12))
    ids = engine.encode(PROMPTS[1])
    with torch.no_grad():
        out = deep["llama"]["base"][0].generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
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
            pair = deep["llama"][name]
            expected = sum(float(full_logprobs(pair[1], ids + resp[:t])[resp[t]]) for t in range(len(resp)))
            tol = ERROR_MULTIPLE * len(resp) * float32_error([pair], [(ids + resp[:-1], len(ids))])
            assert got[name] == pytest.approx(expected, abs=tol, rel=0)


def test_the_hf_model_still_works_after_its_weights_are_fused(deep, tokenizer):
    """The engine fuses q/k/v and gate/up weights and leaves views in the HF modules."""
    engine = deep_engine(deep, "llama", ["late"])
    model = engine.models.base_model
    ids = torch.tensor([engine.encode(PROMPTS[0])])
    base32, base64 = deep["llama"]["base"]
    with torch.no_grad():
        exact = base64(ids).logits
        tol = ERROR_MULTIPLE * float((base32(ids).logits.double() - exact).abs().max())
        assert torch.allclose(model(ids).logits.double(), exact, atol=tol, rtol=0)


def test_unsupported_adapters_are_refused_with_the_reason(deep, tmp_path):
    folder = tmp_path / "dora"
    make_lora(deep["llama"]["base"][0], folder, seed=3, use_dora=True)
    with pytest.raises(ModelLoadError, match="ARM 'dora'.*use_dora"):
        engine_for(deep["root"] / "llama", [{"name": "dora", "adapter": str(folder)}])
    folder = tmp_path / "embed"
    make_lora(deep["llama"]["base"][0], folder, seed=3, targets=("embed_tokens", "q_proj"))
    with pytest.raises(ModelLoadError, match="ARM 'embed'.*embed_tokens"):
        engine_for(deep["root"] / "llama", [{"name": "embed", "adapter": str(folder)}])


def test_unsupported_architecture_is_refused(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    save_model(model, tokenizer, tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported.*llama"):
        engine_for(tmp_path / "gpt2")


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
    pair = lambda m: (m, copy.deepcopy(m).double())  # noqa: E731 - the session's models stay float32
    refs = [pair(merged(tiny["small"], tmp_path / "s1")), pair(merged(tiny["small"], tmp_path / "s2")),
            pair(tiny["help"])]
    base = pair(tiny["base"])
    distributions_match(engine, refs, base)
    weights = (1.5, -0.7, 0.8)
    ids = engine.encode(PROMPTS[1])
    ref = reference_decode(base[1], [r[1] for r in refs], weights, ids, 8, 0.9, seed=2)
    out = engine.generate(PROMPTS[1], dict(zip(["s1", "s2", "help"], weights)),
                          SamplingOptions(temperature=0.9, max_new_tokens=8, seed=2))
    assert out.token_ids == [r[0] for r in ref]
