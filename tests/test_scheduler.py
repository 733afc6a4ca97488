"""Continuous batching: streams join and leave one running batch, and each one's tokens equal
its solo run (the contract), whatever else is batched with it."""
import threading

import pytest
import torch

from conftest import engine_for
from genarm_core import SamplingOptions, kernels

CASES = [  # prompt, panes, options
    ("Tell me about tea.", [{"help": 1.0}, {}], SamplingOptions(temperature=0.9, max_new_tokens=14, seed=1)),
    ("How do I fix a flat bicycle tyre quickly and without tools?", [{"harm": 2.0, "small": -0.5}],
     SamplingOptions(temperature=0.7, top_p=0.8, max_new_tokens=10, seed=2)),
    ("Write one line.", [{"small": 1.5}], SamplingOptions(temperature=0.0, max_new_tokens=12)),
    ("Name three colours, please.", [{"help": -0.5}, {"help": 2.0, "harm": 1.0}],
     SamplingOptions(temperature=1.1, top_k=30, max_new_tokens=16, seed=3, normalised=True)),
    ("Why is the sky blue?", [{}], SamplingOptions(temperature=0.8, top_p=0.95, max_new_tokens=12, seed=4)),
]


def same_as_solo(engine, got, solo) -> bool:
    """The engine's contract: where it claims batch invariance (models.batch_invariant, decided by
    measurement on this CPU), a stream's events are bit-identical to its solo run; where it does
    not, its tokens, text and finish reasons are, and its log-probs agree to float32 rounding."""
    if engine.models.batch_invariant:
        return got == solo
    strip = lambda steps: [[(e[0], e[1], e[2], e[4]) for e in step] for step in steps]  # noqa: E731
    lps = lambda steps: [e[3] for step in steps for e in step]  # noqa: E731
    return strip(got) == strip(solo) and lps(got) == pytest.approx(lps(solo), rel=1e-4, abs=1e-4)


def record(stream, upto=None):
    """All events of a stream (or its first `upto` steps), as comparable tuples."""
    out = []
    for step in stream:
        out.append([(e.pane, e.token_id, e.text, e.logprob_fused, e.finish_reason) for e in step])
        if upto is not None and len(out) == upto:
            break
    return out


def test_streams_joining_and_leaving_mid_flight_equal_their_solo_runs(engine):
    solo = [record(engine.stream(p, panes, o)) for p, panes, o in CASES]
    steps_alone = engine.scheduler.steps
    started = {0: engine.stream(*CASES[0])}
    got = {i: [] for i in range(len(CASES))}
    cancel_at = {3: 4}  # stream 3 is cancelled after 4 of its steps
    live = {0}
    tick = 0
    while live:
        for i in sorted(live):
            try:
                got[i].append([(e.pane, e.token_id, e.text, e.logprob_fused, e.finish_reason)
                               for e in next(started[i])])
            except StopIteration:
                live.discard(i)
                continue
            if cancel_at.get(i) == len(got[i]):
                started[i].cancel()
        tick += 1
        if tick % 2 == 0 and len(started) < len(CASES):  # a new stream joins every other step
            i = len(started)
            started[i] = engine.stream(*CASES[i])
            live.add(i)
    for i, events in got.items():
        if i in cancel_at:
            n = cancel_at[i]
            assert same_as_solo(engine, events[:n], solo[i][:n])
            assert [e[4] for e in events[-1]] == ["cancelled"] * len(CASES[i][1]) and len(events) <= n + 2
        else:
            assert same_as_solo(engine, events, solo[i]), f"stream {i} differs from its solo run"
    together = engine.scheduler.steps - steps_alone
    assert together < steps_alone - 10  # they really ran in shared steps


def test_streams_from_many_threads_equal_their_solo_runs(engine):
    solo = [record(engine.stream(p, panes, o)) for p, panes, o in CASES]
    results = [None] * len(CASES)

    def run(i):
        results[i] = record(engine.stream(*CASES[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(same_as_solo(engine, r, s) for r, s in zip(results, solo))


def test_the_row_cap_queues_streams_in_order(tiny, arms_spec):
    engine = engine_for(tiny["root"] / "base", arms_spec, engine={"max_rows": 4})
    assert engine.models.rows_per_sequence == 4  # base + 2 LoRA ARMs, + the standalone ARM
    opts = SamplingOptions(temperature=0.0, max_new_tokens=5)
    streams = [engine.stream(f"Prompt number {i}.", [{}], opts) for i in range(4)]
    first = next(streams[0])
    assert first and streams[0].started.is_set()
    assert [s.queued for s in streams[1:]] == [True, True, True]
    order = []
    for i, s in enumerate(streams):
        for _ in s:
            pass
        order.append(i)
        if i + 1 < 4:
            assert streams[i + 1].started.wait(10)  # the next one starts as this one leaves...
        assert [j for j in range(i + 2, 4) if not streams[j].queued] == []  # ...the later ones wait
    assert order == [0, 1, 2, 3]


def test_a_request_larger_than_the_cap_still_runs(tiny, arms_spec):
    engine = engine_for(tiny["root"] / "base", arms_spec, engine={"max_rows": 4})
    opts = SamplingOptions(temperature=0.0, max_new_tokens=4)
    alone = [engine.generate(p, [{}, {"help": 1.0}], opts) for p in ("One.", "Two words.")]
    together = engine.generate(["One.", "Two words."], [{}, {"help": 1.0}], opts)  # 16 rows, cap 4
    assert [[c.token_ids for c in r] for r in together] == [[c.token_ids for c in r] for r in alone]


def test_cancelling_a_queued_stream_ends_it_without_running(tiny, arms_spec):
    engine = engine_for(tiny["root"] / "base", arms_spec, engine={"max_rows": 4})
    opts = SamplingOptions(temperature=0.0, max_new_tokens=30)
    running = engine.stream("Keep going.", [{}], opts)
    next(running)
    queued = engine.stream("Never mind.", [{}, {"help": 1.0}], opts)
    assert queued.queued
    queued.cancel()
    events = list(queued)
    assert len(events) == 1 and [e.finish_reason for e in events[0]] == ["cancelled", "cancelled"]
    assert all(e.token_id == -1 for e in events[0])
    running.close()


@pytest.mark.parametrize("max_rows", [0, -3])
def test_a_bad_row_cap_is_a_config_error(tiny, max_rows):
    from genarm_core import ConfigError

    with pytest.raises(ConfigError, match="engine.max_rows: expected an integer >= 1"):
        engine_for(tiny["root"] / "base", [], engine={"max_rows": max_rows})


def test_without_batch_invariance_streams_match_their_solo_runs_to_rounding(tiny, arms_spec):
    """The other side of the contract: an engine that does not claim invariance says so, and its
    batched streams still give their solo tokens (log-probs to float32 rounding)."""
    engine = engine_for(tiny["root"] / "base", arms_spec, engine={"batch_invariant": False})
    assert not engine.models.batch_invariant and "off in the profile" in engine.models.runtime.invariance
    solo = [record(engine.stream(p, panes, o)) for p, panes, o in CASES]
    results = [None] * len(CASES)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, record(engine.stream(*CASES[i]))))
               for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(same_as_solo(engine, r, s) for r, s in zip(results, solo))


# ---- batched, chunked prefill under a token budget per step ------------------------------------
@pytest.fixture(scope="module")
def small_steps(tiny, arms_spec):
    """Steps of at most 5 tokens: prompts are written in chunks beside the running decodes."""
    return engine_for(tiny["root"] / "base", arms_spec, engine={"step_tokens": 5})


def test_prompts_written_in_chunks_give_their_whole_prompt_runs_bit_for_bit(engine, small_steps):
    assert small_steps.core.runner.ragged and small_steps.core.scheduler.step_tokens == 5
    for case in CASES:
        assert record(small_steps.stream(*case)) == record(engine.stream(*case))


def test_streams_joining_in_chunks_equal_their_solo_runs(small_steps):
    """Later streams' prompts are written chunk by chunk while earlier ones decode."""
    solo = [record(small_steps.stream(p, panes, o)) for p, panes, o in CASES]
    results = [None] * len(CASES)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, record(small_steps.stream(*CASES[i]))))
               for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo


def test_a_long_prompt_joining_never_holds_a_running_stream(small_steps, monkeypatch):
    """While a 60-token prompt is written at most 5 tokens a step, the running stream decodes in
    every one of those steps: it never waits for the whole prompt."""
    scheduler = small_steps.core.scheduler
    plans = []
    real = scheduler.plan
    monkeypatch.setattr(scheduler, "plan", lambda: plans.append(real()) or plans[-1])
    running = small_steps.stream("Keep going.", [{}], SamplingOptions(temperature=0, max_new_tokens=40))
    next(running)
    long_prompt = "Please describe, in great detail and with many examples, " * 4
    n = len(small_steps.encode(long_prompt))
    assert n > 40
    joining = small_steps.stream(long_prompt, [{"help": 1.0}], SamplingOptions(temperature=0, max_new_tokens=3))
    assert len(list(joining)) == 3
    running.close()
    writing = [p for p in plans if any(len(g.ids) == n for g, _, _ in p.chunks)]
    assert len(writing) >= n // 5  # the prompt took several steps...
    assert all(p.tokens <= 5 and len(p.decode) == 1 for p in writing)  # ...each beside the running decode
    assert sum(b - a for p in writing for _, a, b in p.chunks) == n


def test_waiting_prompts_are_written_together_in_one_forward(tiny, arms_spec, monkeypatch):
    engine = engine_for(tiny["root"] / "base", arms_spec, engine={"step_tokens": 512})
    plans = []
    real = engine.core.scheduler.plan
    monkeypatch.setattr(engine.core.scheduler, "plan", lambda: plans.append(real()) or plans[-1])
    prompts = [engine.encode(p) for p in ("One.", "Two words here.", "Three words, please, now.")]
    opts = SamplingOptions(temperature=0, max_new_tokens=4)
    steps = list(engine.stream_ids(prompts, [{}, {"help": 1.0}], opts))
    assert sorted((e.prompt, e.pane) for e in steps[0]) == [(p, k) for p in range(3) for k in range(2)]
    assert [(a, b) for _, a, b in plans[0].chunks] == [(0, len(p)) for p in prompts]  # one forward, no padding
    assert plans[0].tokens == sum(map(len, prompts)) and all(not p.chunks for p in plans[1:])
    alone = [engine.generate([p], [{}, {"help": 1.0}], opts) for p in ("One.", "Two words here.", "Three words, please, now.")]
    together = engine.generate(["One.", "Two words here.", "Three words, please, now."], [{}, {"help": 1.0}], opts)
    assert [[c.token_ids for c in r] for r in together] == [[c.token_ids for c in r[0]] for r in alone]


@pytest.mark.parametrize("form", ["timed", "wt", "mkldnn", "native"])
def test_the_torch_path_writes_prompts_whole_and_still_matches_solo_runs(tiny, arms_spec, form, monkeypatch, tmp_path):
    """Without the native kernels (GPUs, bf16): prompts are written whole and alone, decodes batch.
    Which batch-invariant form each product uses is decided by timing ('timed'), so each form is
    also forced wherever it was measured invariant: what runs after a product (SiLU, rotary, the
    LoRA deltas) must keep rows independent of the batch whatever form produced them."""
    if form != "timed":
        if form not in kernels.capabilities("cpu", torch.float32).forms:
            pytest.skip(f"{form} is not offered here")
        fastest = kernels._least_regret
        monkeypatch.setattr(kernels, "_least_regret", lambda times, found: form if form in found else fastest(times, found))
        monkeypatch.setenv("GENARM_TUNING_CACHE", str(tmp_path))  # measured again, with the forced choice
    engine = engine_for(tiny["root"] / "base", arms_spec, engine={"native_step": False})
    assert not engine.core.runner.ragged and not engine.core.scheduler.chunked
    solo = [record(engine.stream(p, panes, o)) for p, panes, o in CASES]
    results = [None] * len(CASES)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, record(engine.stream(*CASES[i]))))
               for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(same_as_solo(engine, r, s) for r, s in zip(results, solo))


def test_a_bad_step_budget_is_a_config_error(tiny):
    from genarm_core import ConfigError

    with pytest.raises(ConfigError, match="engine.step_tokens: expected an integer >= 1"):
        engine_for(tiny["root"] / "base", [], engine={"step_tokens": 0})
