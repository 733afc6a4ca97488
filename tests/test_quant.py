"""Weights held as GGUF blocks (quant.py) and the native few-row kernels (native.py): each
kernel equals x W^T over the dequantized weights to float32 rounding and gives a row the same
bits whatever else is in the batch; blocks read from a GGUF file equal gguf-py's and
transformers' reading; an engine on blocks equals the full-recompute reference over the same
dequantized weights and transformers' generate on them."""
import copy

import numpy as np
import pytest
import torch

from conftest import engine_for, make_lora, make_model, merged, save_model
from genarm_core import SamplingOptions, kernels, native, quant
from reference import Float32Budget, full_logprobs, reference_decode

NATIVE = native.load()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"native kernels not available: {native.why_not()}")


def random_blocks(kind, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quant.quantize(torch.randn(n, k, generator=g) * 0.1, kind)


@needs_native
@pytest.mark.parametrize("kind", ["f32", "q4_1", "q8_0"])
def test_native_products_equal_x_w_transposed_and_do_not_depend_on_the_batch(kind):
    n, k = (37, 70) if kind == "f32" else (37, 96)  # odd sizes: the tails of both loops
    g = torch.Generator().manual_seed(1)
    if kind == "f32":
        w = torch.randn(n, k, generator=g)
        bias = torch.randn(n, generator=g)
        run = lambda x: NATIVE.mm_f32(x, w, bias)  # noqa: E731
        exact_w, exact_b = w.double(), bias.double()
    else:
        q = random_blocks(kind, n, k)
        run = lambda x: q.product(NATIVE, x)  # noqa: E731
        exact_w, exact_b = q.dequantize().double(), torch.zeros(n, dtype=torch.float64)
    x = torch.randn(9, k, generator=g)
    alone = [run(x[i:i + 1]) for i in range(9)]
    for R in range(1, 10):
        y = run(x[:R])
        exact = x[:R].double() @ exact_w.T + exact_b
        bound = 2 * kernels.rounding_bound(x[:R], exact_w.float()) + torch.finfo(torch.float32).eps * exact_b.abs()
        assert ((y.double() - exact).abs() <= bound + 1e-12).all()
        for i in range(R):
            assert torch.equal(y[i:i + 1], alone[i]), f"row {i} of {R} differs from its solo run"


@needs_native
def test_native_products_write_into_a_slice_of_a_wider_output():
    q, w = random_blocks("q4_1", 12, 64), torch.randn(5, 64)
    x = torch.randn(3, 64)
    out = torch.full((3, 17), float("nan"))
    q.product(NATIVE, x, out[:, :12])
    NATIVE.mm_f32(x, w, None, out[:, 12:])
    assert torch.equal(out[:, :12], q.product(NATIVE, x)) and torch.equal(out[:, 12:], NATIVE.mm_f32(x, w))


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_blocks_read_like_gguf_py_and_quantize_to_nearest(kind):
    from gguf import GGMLQuantizationType, quants

    a = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    gtype = getattr(GGMLQuantizationType, kind.upper())
    raw = quants.quantize(a, gtype)
    ours = quant.from_gguf_blocks(kind, torch.from_numpy(raw))
    assert torch.equal(ours.dequantize(), torch.from_numpy(quants.dequantize(raw, gtype)))
    w = torch.from_numpy(a)
    q = quant.quantize(w, kind)
    step = q.d.repeat_interleave(32, 1)  # each weight within half a step (plus float16 scales' rounding)
    assert ((q.dequantize() - w).abs() <= 0.5 * step * 1.01 + 1e-3 * w.abs().amax()).all()


def test_q_and_k_rows_are_unpermuted_as_transformers_does():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    for rows, heads in [(576, 9), (192, 3), (64, 4)]:
        expected = LlamaTensorProcessor()._reverse_permute_weights(np.arange(rows)[:, None], heads, heads)[:, 0]
        assert quant._unpermute(rows, heads).tolist() == expected.tolist()


def test_a_gguf_files_blocks_are_read_under_transformers_names(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    rng = np.random.default_rng(1)
    tensors = {"blk.0.attn_q.weight": ((8, 64), "Q4_1"), "blk.0.attn_k.weight": ((4, 64), "Q4_1"),
               "blk.0.ffn_down.weight": ((64, 128), "Q4_1"), "token_embd.weight": ((10, 64), "Q8_0"),
               "blk.0.attn_norm.weight": ((64,), "F32")}
    writer = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    dense = {}
    for name, (shape, t) in tensors.items():
        a = rng.standard_normal(shape).astype(np.float32)
        gtype = getattr(GGMLQuantizationType, t)
        data = a if t == "F32" else quants.quantize(a, gtype)
        dense[name] = a if t == "F32" else quants.dequantize(data, gtype)
        writer.add_tensor(name, data, raw_dtype=None if t == "F32" else gtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = quant.read_gguf(tmp_path / "t.gguf", heads=2, kv_heads=1)
    assert set(got) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                        "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"}
    assert got["model.embed_tokens.weight"].kind == "q8_0"
    q = torch.from_numpy(dense["blk.0.attn_q.weight"])
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"].dequantize(), q[quant._unpermute(8, 2)])
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"].dequantize(),
                       torch.from_numpy(dense["blk.0.ffn_down.weight"]))


# ---- an engine on blocks ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def on_blocks(tmp_path_factory, tokenizer):
    """A 3-layer Llama with two LoRA ARMs, its engine with int4 weights (quantized here), and
    reference models over the very weights the blocks hold (dequantized), float32 and float64."""
    root = tmp_path_factory.mktemp("blocks")
    base = make_model(tokenizer, "llama", seed=7, layers=3)
    save_model(base, tokenizer, root / "base")
    make_lora(base, root / "a", seed=8, targets=("q_proj", "v_proj", "down_proj"), layers=[1, 2])
    make_lora(base, root / "b", seed=9, targets=("o_proj", "gate_proj", "up_proj"), layers=[2])
    arms = [{"name": n, "adapter": str(root / n), "beta": 1.0} for n in "ab"]
    engine = engine_for(root / "base", arms, engine={"weights": "int4"})
    deq = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in deq.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(quant.quantize(p, "q4_1").dequantize())
            elif name == "lm_head.weight":
                p.copy_(quant.quantize(p, "q8_0").dequantize())
    models = [deq, merged(deq, root / "a"), merged(deq, root / "b")]
    return engine, [(m, copy.deepcopy(m).double()) for m in models]


@needs_native
def test_an_engine_on_blocks_reports_them_and_claims_batch_invariance(on_blocks):
    engine, _ = on_blocks
    r = engine.models.runtime
    assert "int4: quantized here" in r.weights and {"q4_1", "q8_0"} <= set(r.forms_used)
    assert engine.models.batch_invariant and r.invariant


@needs_native
def test_an_engine_on_blocks_equals_the_full_recompute_over_the_dequantized_weights(on_blocks):
    from genarm_core.backbone import Cache

    engine, models = on_blocks
    m = engine.models
    budget = Float32Budget()
    seqs = [engine.encode(p) for p in ("Tell me about tea.", "How do I fix a flat tyre?")]
    caches = [Cache(bb) for bb in m.backbones]
    outs = [[bb.prefill(ids) for ids in seqs] for bb in m.backbones]
    for cache, o in zip(caches, outs):
        cache.append([e for e, _ in o])
    lp = m.split_rows([torch.cat([torch.log_softmax(lg, -1) for _, lg in o]) for o in outs])
    for step in range(4):
        for s, ids in enumerate(seqs):
            budget.add(lp[0][s], *models[0], ids)
            for i in range(2):
                budget.add(lp[1][s, i], *models[1 + i], ids)
        tokens = torch.tensor([200 + 5 * s + step for s in range(len(seqs))])
        seqs = [ids + [int(t)] for ids, t in zip(seqs, tokens)]
        lp = m.split_rows([torch.log_softmax(bb.step(c, tokens), -1) for bb, c in zip(m.backbones, caches)])
    budget.check()
    weights = (1.5, -0.5)
    ids = engine.encode("Name three colours.")
    ref = reference_decode(models[0][1], [models[1][1], models[2][1]], weights, ids, 10, 0.8, top_p=0.9, seed=3)
    out = engine.generate("Name three colours.", dict(zip("ab", weights)),
                          SamplingOptions(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=3))
    assert out.token_ids == [r[0] for r in ref]


@needs_native
def test_weights_zero_greedy_on_blocks_equals_generate_on_the_dequantized_model(on_blocks):
    engine, models = on_blocks
    ids = engine.encode("How do I fix a flat tyre?")
    result = engine.generate("How do I fix a flat tyre?", {}, SamplingOptions(temperature=0, max_new_tokens=12))
    with torch.no_grad():
        out = models[0][0].generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=2,
                                    eos_token_id=2)
    assert result.token_ids == out[0, len(ids):].tolist()


@needs_native
def test_streams_on_blocks_equal_their_solo_runs_bit_for_bit(on_blocks):
    import threading

    engine, _ = on_blocks
    cases = [("Tell me about tea.", [{"a": 1.0}, {}], SamplingOptions(temperature=0.9, max_new_tokens=10, seed=1)),
             ("Why is the sky blue?", [{"b": 2.0}], SamplingOptions(temperature=0.7, max_new_tokens=8, seed=2)),
             ("Write one line.", [{"a": -1.0, "b": 1.0}], SamplingOptions(temperature=0, max_new_tokens=9))]
    record = lambda s: [[(e.pane, e.token_id, e.logprob_fused, e.finish_reason) for e in step] for step in s]  # noqa: E731
    solo = [record(engine.stream(*c)) for c in cases]
    got = [None] * len(cases)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, record(engine.stream(*cases[i]))))
               for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == solo


def test_blocks_on_a_gpu_or_in_bfloat16_are_refused_with_the_reason(tiny):
    from genarm_core import ModelLoadError

    with pytest.raises(ModelLoadError, match="weights int4 computes in float32; dtype bfloat16"):
        engine_for(tiny["root"] / "base", dtype="bfloat16", engine={"weights": "int4"})


def test_a_bad_weights_switch_is_a_config_error(tiny):
    from genarm_core import ConfigError

    with pytest.raises(ConfigError, match="engine.weights: expected one of auto, dense, int4, int8, got 'int3'"):
        engine_for(tiny["root"] / "base", engine={"weights": "int3"})


def test_blocks_without_the_native_kernels_are_refused_with_the_reason(tiny, monkeypatch):
    from genarm_core import ModelLoadError

    monkeypatch.setattr(native, "_state", {"module": None, "why": "not usable: this CPU has no AVX2 and FMA"})
    with pytest.raises(ModelLoadError, match="weights int4 needs the native kernels, which are not usable: this CPU has no AVX2"):
        engine_for(tiny["root"] / "base", engine={"weights": "int4"})
