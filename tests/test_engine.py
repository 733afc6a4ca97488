import copy
import gc
import math
import threading
import weakref

import pytest
import torch

from conftest import engine_for, make_model, save_model
from genarm_core import Pane, RequestError, SamplingOptions
from reference import ERROR_MULTIPLE, float32_error, full_logprobs, reference_decode



@pytest.fixture(scope="module")
def tol(tiny, engine):
    """How far the engine's float32 log-probs may be from transformers' float32 references: both
    within reference.ERROR_MULTIPLE (engine) and 1 (transformers) times transformers' own float32
    error against float64, measured here on the prompts and a greedy continuation of each."""
    pairs = [(m, copy.deepcopy(m).double()) for m in [tiny["base"], *arm_models(tiny)]]
    sequences = []
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        with torch.no_grad():
            out = tiny["base"].generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, pad_token_id=2)
        sequences.append((out[0].tolist(), len(ids)))
    return (ERROR_MULTIPLE + 1) * float32_error(pairs, sequences)
PROMPTS = ["Tell me about tea.", "How do I fix a flat bicycle tyre quickly?"]


def arm_models(tiny):
    return [tiny["help"], tiny["harm"], tiny["small"]]


def wait_idle(engine, timeout=30.0):
    """Waits until the scheduler has no work left (its thread exits when idle)."""
    import time

    end = time.monotonic() + timeout
    while engine.scheduler.has_work() and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.05)  # the worker frees the batch on its next turn
    assert not engine.scheduler.has_work(), "the scheduler did not go idle"


def run_stream(engine, prompt, panes, opts):
    events = [[] for _ in panes]
    for step in engine.stream(prompt, panes, opts):
        for ev in step:
            events[ev.pane].append(ev)
    return events


def assert_matches(events, ref, tol, weights=()):
    """Tokens equal; log-probs within tol (the fused one sums 1 + sum |w| models' log-probs)."""
    assert [e.token_id for e in events] == [r[0] for r in ref]
    fused_tol = tol * (1 + sum(abs(w) for w in weights))
    for e, (tok, lp_base, lp_arms, lp_fused) in zip(events, ref):
        assert e.logprob_base == pytest.approx(lp_base, abs=tol, rel=0)
        assert list(e.logprob_arms.values()) == pytest.approx(lp_arms, abs=tol, rel=0)
        assert e.logprob_fused == pytest.approx(lp_fused, abs=fused_tol, rel=0)


def test_zero_weights_greedy_equals_transformers_generate(engine, tiny):
    """With every ARM loaded but at weight 0, the base rows of the mixed batch are the base model."""
    opts = SamplingOptions(temperature=0, max_new_tokens=12)
    results = engine.generate(PROMPTS, {}, opts)  # two prompts of different lengths: left padding
    for prompt, result in zip(PROMPTS, results):
        ids = engine.encode(prompt)
        with torch.no_grad():
            out = tiny["base"].generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                        pad_token_id=2, eos_token_id=2)
        assert result.token_ids == out[0, len(ids):].tolist()


def test_zero_weights_sampling_equals_plain_softmax_sampler(engine, tiny, tol):
    opts = SamplingOptions(temperature=0.9, max_new_tokens=10, seed=7)
    ids = engine.encode(PROMPTS[0])
    ref = reference_decode(tiny["base"], [], [], ids, 10, temperature=0.9, seed=7)
    events = run_stream(engine, PROMPTS[0], [{}], opts)[0]
    assert [e.token_id for e in events] == [r[0] for r in ref]
    for e, r in zip(events, ref):
        assert e.logprob_base == pytest.approx(r[1], abs=tol, rel=0)
        assert e.logprob_fused == pytest.approx(r[1], abs=tol, rel=0)  # fused == base at weight 0


@pytest.mark.parametrize("weights,temperature,top_k,top_p,normalised", [
    ((1.0, 0.0, 0.0), 0.0, 0, 1.0, False),
    ((2.0, -1.0, 0.5), 0.0, 0, 1.0, False),
    ((1.5, 0.5, -0.5), 0.8, 0, 1.0, False),
    ((1.0, 1.0, 1.0), 1.0, 20, 1.0, False),
    ((0.5, -0.5, 2.0), 0.7, 0, 0.6, False),
    ((3.0, 1.0, 0.0), 1.2, 50, 0.9, True),
])
def test_fused_decoding_equals_full_recompute(engine, tiny, tol, weights, temperature, top_k, top_p, normalised):
    names = engine.arm_names
    opts = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=8,
                           seed=3, normalised=normalised)
    ids = engine.encode(PROMPTS[1])
    ref = reference_decode(tiny["base"], arm_models(tiny), weights, ids, 8, temperature, top_k, top_p,
                           seed=3, normalised=normalised)
    events = run_stream(engine, PROMPTS[1], [dict(zip(names, weights))], opts)[0]
    assert_matches(events, ref, tol, weights)


@pytest.mark.parametrize("penalty,ngram,min_p,temperature,top_p", [
    (1.3, 0, 0.0, 0.0, 1.0), (1.0, 2, 0.0, 0.0, 1.0), (1.5, 3, 0.0, 0.9, 0.9), (1.0, 0, 0.2, 1.0, 1.0),
    (1.2, 2, 0.05, 0.8, 0.95), (0.8, 0, 0.1, 1.2, 1.0),
])
def test_repetition_rules_and_min_p_equal_the_reference(engine, tiny, tol, penalty, ngram, min_p, temperature, top_p):
    names = engine.arm_names
    weights = (1.0, 0.5, -0.5)
    opts = SamplingOptions(temperature=temperature, top_p=top_p, max_new_tokens=16, seed=6,
                           repetition_penalty=penalty, no_repeat_ngram_size=ngram, min_p=min_p)
    ids = engine.encode(PROMPTS[0])
    ref = reference_decode(tiny["base"], arm_models(tiny), weights, ids, 16, temperature, 0, top_p, seed=6,
                           repetition_penalty=penalty, no_repeat_ngram_size=ngram, min_p=min_p)
    events = run_stream(engine, PROMPTS[0], [dict(zip(names, weights))], opts)[0]
    assert_matches(events, ref, tol, weights)


def test_no_repeat_ngrams_never_repeat_in_the_answer(engine):
    opts = SamplingOptions(temperature=0.0, max_new_tokens=150, no_repeat_ngram_size=2)
    ids = engine.encode(PROMPTS[1])
    out = engine.generate(PROMPTS[1], {"help": 3.0}, opts).token_ids
    seq = ids + out
    for j in range(len(ids), len(seq)):  # no answer token completes a pair seen before it
        earlier = {tuple(seq[i:i + 2]) for i in range(j - 1)}
        assert (seq[j - 1], seq[j]) not in earlier


def test_every_step_distribution_equals_full_recompute(engine, tiny, tol):
    """The whole vocabulary, not only the chosen token: LoRA rows of one backbone equal the
    merged adapters run as separate models, the standalone ARM equals its own full recompute;
    sequences of different lengths join one cache and one leaves mid-way."""
    from genarm_core.backbone import Cache

    m = engine.models
    prompts = [engine.encode(p) for p in PROMPTS]
    seqs = [list(prompts[0]), list(prompts[0]), list(prompts[1])]
    caches = [Cache(bb) for bb in m.backbones]
    outputs = [[bb.prefill(ids) for ids in seqs] for bb in m.backbones]
    for cache, outs in zip(caches, outputs):
        cache.append([entry for entry, _ in outs])
    base_lp, arm_lp = m.split_rows([torch.cat([torch.log_softmax(lg, -1) for _, lg in outs]) for outs in outputs])

    def check(base_lp, arm_lp, seqs, models):
        for s, ids in enumerate(seqs):
            assert torch.allclose(base_lp[s].double(), full_logprobs(tiny["base"], ids), atol=tol, rtol=0)
            for i, model in models:
                assert torch.allclose(arm_lp[s, i].double(), full_logprobs(model, ids), atol=tol, rtol=0)

    for step in range(4):
        check(base_lp, arm_lp, seqs, enumerate(arm_models(tiny)))
        tokens = torch.tensor([100 + step, 200 + step, 300 + step])
        for s in range(3):
            seqs[s].append(int(tokens[s]))
        base_lp, arm_lp = m.split_rows([torch.log_softmax(bb.step(c, tokens), -1) for bb, c in zip(m.backbones, caches)])
    for cache in caches:  # dropping a finished sequence keeps the others intact
        cache.keep([0, 2])
    del seqs[1]
    tokens = torch.tensor([7, 8])
    seqs[0].append(7)
    seqs[1].append(8)
    base_lp, arm_lp = m.split_rows([torch.log_softmax(bb.step(c, tokens), -1) for bb, c in zip(m.backbones, caches)])
    check(base_lp, arm_lp, seqs, enumerate(arm_models(tiny)))


def test_weak_to_strong_standalone_arm_of_another_size(tiny, tol):
    engine = engine_for(tiny["root"] / "base", [{"name": "small", "model": {"path": str(tiny["root"] / "small")}}])
    assert engine.models.row_names == [["base"], ["small"]]
    opts = SamplingOptions(temperature=0.0, max_new_tokens=6)
    ids = engine.encode(PROMPTS[0])
    ref = reference_decode(tiny["base"], [tiny["small"]], [2.0], ids, 6)
    assert_matches(run_stream(engine, PROMPTS[0], [{"small": 2.0}], opts)[0], ref, tol, [2.0])


def test_weight_change_mid_stream_applies_from_next_token(engine, tiny, tol):
    names = engine.arm_names
    before, after, switch = (0.0, 0.0, 0.0), (3.0, 0.0, 1.0), 3
    opts = SamplingOptions(temperature=0.8, max_new_tokens=7, seed=11)
    pane = Pane(dict(zip(names, before)))
    events = []
    for step in engine.stream(PROMPTS[0], [pane], opts):
        events.append(step[0])
        if len(events) == switch:
            pane.set_weights(dict(zip(names, after)))
    ids = engine.encode(PROMPTS[0])
    ref = reference_decode(tiny["base"], arm_models(tiny), None, ids, 7, 0.8, seed=11,
                           weights_at=lambda s: before if s < switch else after)
    assert_matches(events, ref, tol, after)
    assert [e.weights == dict(zip(names, before)) for e in events] == [True] * switch + [False] * 4
    # and before the switch nothing differs from a run that never changes weights
    unchanged = run_stream(engine, PROMPTS[0], [dict(zip(names, before))], opts)[0]
    assert [e.token_id for e in unchanged[:switch]] == [e.token_id for e in events[:switch]]
    assert [e.logprob_fused for e in unchanged[switch:]] != pytest.approx([e.logprob_fused for e in events[switch:]])


def test_panes_share_random_draws(engine):
    opts = SamplingOptions(temperature=1.0, max_new_tokens=12, seed=5)
    same = {"help": 1.0, "harm": 0.5}
    panes = run_stream(engine, PROMPTS[0], [same, dict(same), {"help": -1.5, "small": 3.0}], opts)
    text = ["".join(e.text for e in p) for p in panes]
    assert text[0] == text[1] and [e.token_id for e in panes[0]] == [e.token_id for e in panes[1]]
    assert [e.token_id for e in panes[2]] != [e.token_id for e in panes[0]]
    # a pane's sample does not depend on which other panes share the batch
    alone = run_stream(engine, PROMPTS[0], [{"help": -1.5, "small": 3.0}], opts)[0]
    assert [e.token_id for e in alone] == [e.token_id for e in panes[2]]


def test_generate_batches_prompts_like_single_calls(engine, tol):
    """The batch-invariance contract: bit-equal where the engine claims it, else within rounding."""
    opts = SamplingOptions(temperature=0.7, max_new_tokens=8, seed=2)
    w = {"help": 1.0, "small": -0.5}
    together = engine.generate(PROMPTS, w, opts)
    for prompt, result in zip(PROMPTS, together):
        alone = engine.generate(prompt, w, opts)
        assert alone.token_ids == result.token_ids
        if engine.models.batch_invariant:
            assert alone.logprobs_fused == result.logprobs_fused
        else:
            assert alone.logprobs_fused == pytest.approx(result.logprobs_fused, abs=2.5 * tol, rel=0)


def test_eos_by_token_id_and_incremental_text(tiny, tokenizer):
    engine = engine_for(tiny["root"] / "base")
    free = engine.generate(PROMPTS[0], {}, SamplingOptions(temperature=0, max_new_tokens=10))
    assert free.finish_reason == "length"
    assert free.text == tokenizer.decode(free.token_ids, skip_special_tokens=True)
    engine.models.eos_ids = [2, free.token_ids[4]]  # pretend the 5th token is an end-of-turn token
    stopped = engine.generate(PROMPTS[0], {}, SamplingOptions(temperature=0, max_new_tokens=10))
    assert stopped.finish_reason == "eos" and stopped.token_ids == free.token_ids[:5]
    assert stopped.text == tokenizer.decode(free.token_ids[:4], skip_special_tokens=True)


def test_stop_strings_end_the_answer_before_the_stop(tiny, tokenizer):
    engine = engine_for(tiny["root"] / "base")
    free = engine.generate(PROMPTS[1], {}, SamplingOptions(temperature=0, max_new_tokens=12))
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    cut = engine.generate(PROMPTS[1], {}, SamplingOptions(temperature=0, max_new_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]


def test_cancel_frees_caches_and_reports(engine):
    stream = engine.stream(PROMPTS[0], [{"help": 1.0}, {}], SamplingOptions(max_new_tokens=50))
    first = next(stream)
    assert len(first) == 2 and not first[0].finished
    caches = [weakref.ref(c) for c in engine.scheduler.caches]
    assert caches and all(ref() is not None for ref in caches)
    threading.Thread(target=stream.cancel).start()
    rest = list(stream)
    assert rest[-1][0].finish_reason == "cancelled" and len(rest) <= 3
    wait_idle(engine)
    gc.collect()
    assert all(ref() is None for ref in caches) and engine.scheduler.rows_in_flight == 0


def test_closing_a_stream_midway_frees_caches(engine):
    stream = engine.stream(PROMPTS[0], [{}], SamplingOptions(max_new_tokens=50))
    next(stream)
    ref = weakref.ref(engine.scheduler.caches[0])
    stream.close()
    wait_idle(engine)
    gc.collect()
    assert ref() is None and engine.scheduler.rows_in_flight == 0


def test_a_dropped_stream_is_cancelled(engine):
    stream = engine.stream(PROMPTS[0], [{}], SamplingOptions(max_new_tokens=200))
    next(stream)
    del stream
    gc.collect()
    wait_idle(engine)
    assert engine.scheduler.rows_in_flight == 0


def test_score_is_beta_times_response_logprob(engine, tiny, tokenizer):
    prompt, response = "Say hi.", "Hi there, friend!"
    rewards = engine.score(prompt, response)
    ids = engine.encode(prompt)
    resp = tokenizer(response, add_special_tokens=False)["input_ids"] + [2]
    for name, model in zip(engine.arm_names, arm_models(tiny)):
        expected = sum(float(full_logprobs(model, ids + resp[:t])[resp[t]]) for t in range(len(resp)))
        assert rewards[name] == pytest.approx(engine.models.betas[name] * expected, rel=1e-4)
    batch = engine.score(prompt, [response, "No."])
    assert batch[0] == pytest.approx(rewards, rel=1e-5)


@pytest.mark.parametrize("weights,message", [
    ({"nope": 1.0}, "unknown ARM"),
    ({"help": float("nan")}, "finite"),
    ({"help": 99.0}, "outside its range"),
    ({"help": "1"}, "expected a number"),
])
def test_bad_weights_are_refused(engine, weights, message):
    with pytest.raises(RequestError, match=message):
        engine.stream("hi", [weights])


def test_bad_prompts_and_options_are_refused(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.generate("   ", {})
    with pytest.raises(RequestError, match="context of 256"):
        engine.generate("word " * 300, {})
    with pytest.raises(RequestError, match="context of 256"):
        engine.generate("hello", {}, SamplingOptions(max_new_tokens=250))
    with pytest.raises(RequestError, match="top_p"):
        engine.generate("hello", {}, SamplingOptions(top_p=0))
    with pytest.raises(RequestError, match="normalised"):
        engine.generate("hello", {"help": -2.0}, SamplingOptions(normalised=True))


def test_failed_request_leaves_other_streams_untouched(engine):
    opts = SamplingOptions(temperature=0.5, max_new_tokens=6, seed=1)
    expected = engine.generate(PROMPTS[0], {"help": 1.0}, opts)
    stream = engine.stream(PROMPTS[0], [{"help": 1.0}], opts)
    got = [next(stream)[0]]
    with pytest.raises(RequestError):
        engine.stream(PROMPTS[0], [{"help": math.inf}], opts)
    got += [s[0] for s in stream]
    assert [e.token_id for e in got] == expected.token_ids


def test_incompatible_tokenizer_is_refused(tmp_path, tiny):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from genarm_core import ModelLoadError

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("a b c d e".split())}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", bos_token="<s>")
    save_model(make_model(other_tok, "llama", seed=9, hidden=32, layers=1), other_tok, tmp_path / "other")
    with pytest.raises(ModelLoadError, match="ARM 'other'.*different tokenizer"):
        engine_for(tiny["root"] / "base", [{"name": "other", "model": {"path": str(tmp_path / "other")}}])


def test_missing_adapter_is_a_clear_error(tmp_path, tiny):
    from genarm_core import ModelLoadError

    with pytest.raises(ModelLoadError, match="ARM 'help': no LoRA adapter at"):
        engine_for(tiny["root"] / "base", [{"name": "help", "adapter": str(tmp_path / "missing")}])


def test_prefix_cache_restart_equals_a_fresh_prefill(engine):
    """A restart with new weights reuses the prompt's caches (no prefill) and changes nothing."""
    opts = SamplingOptions(temperature=0.9, max_new_tokens=8, seed=4)
    weights = [{"help": 2.0, "small": 1.0}, {"harm": -1.0}]
    engine.prefix_cache.clear()
    fresh = [[(e.token_id, e.logprob_fused) for e in p] for p in run_stream(engine, PROMPTS[1], weights, opts)]
    hits = engine.prefix_cache.hits
    for _ in range(2):  # decoding from a cached prefix must not alter the stored entry
        again = [[(e.token_id, e.logprob_fused) for e in p] for p in run_stream(engine, PROMPTS[1], weights, opts)]
        assert again == fresh
    assert engine.prefix_cache.hits == hits + 2
    engine.prefix_cache.clear()
    assert [[(e.token_id, e.logprob_fused) for e in p] for p in run_stream(engine, PROMPTS[1], weights, opts)] == fresh
