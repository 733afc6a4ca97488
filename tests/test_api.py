"""The programs' side of the server, on the tiny engine: the OpenAI-compatible routes driven by the
real `openai` client (and raw HTTP where the client hides what is tested), and the request schema
reaching every surface: the CLI, profile defaults, the page, the Gradio API and the OpenAI routes."""
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import profile_dict
from genarm_core import Completion, SamplingOptions
from genarm_core.cli import build_parser
from genarm_core.cli._common import sampling_options
from genarm_core.config import parse_config
from genarm_core.prompts import prompt_ids
from genarm_core.request import SAMPLING_NAMES

import demo.requests
from demo import build_app
from demo.requests import run_inputs

openai = pytest.importorskip("openai")

PROMPT = "Tell me about tea."
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    from gradio_client import Client

    app = build_app(engine, votes_path=tmp_path_factory.mktemp("votes") / "votes.sqlite")
    running = app.serve_in_background()
    yield app, running.url, lambda: Client(running.url, verbose=False)
    running.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "v1", api_key="unused", max_retries=0, timeout=120)


def full(engine, weights: dict) -> dict:
    return {n: float(weights.get(n, 0.0)) for n in engine.arm_names}


def wait_idle(app, engine, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while (app.active or engine.scheduler.rows_in_flight) and time.time() < deadline:
        time.sleep(0.02)
    return not app.active and engine.scheduler.rows_in_flight == 0


# ---- the OpenAI-compatible routes ---------------------------------------------------------------
def test_models_lists_the_offered_profiles_and_their_arms(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [engine.profile.name]
    assert [a["name"] for a in models[0].arms] == engine.arm_names


def test_a_streamed_chat_completion_with_weights_equals_engine_generate(client, engine):
    w = {"help": 1.5, "small": -0.5}
    chunks = list(client.chat.completions.create(
        model=engine.profile.name, messages=MESSAGES, max_tokens=12, seed=7, temperature=0.9, stream=True,
        logprobs=True, extra_body={"weights": w, "top_k": 50}))
    want = engine.generate(MESSAGES, full(engine, w), SamplingOptions(temperature=0.9, top_p=0.9, max_new_tokens=12,
                                                                      seed=7, top_k=50))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert text == want.text and [t.token_id for t in tokens] == want.token_ids
    assert [t.logprob for t in tokens] == pytest.approx(want.logprobs_fused, abs=1e-5)
    assert [t.logprob_base for t in tokens] == pytest.approx(want.logprobs_base, abs=1e-5)
    assert [t.logprob_arms["help"] for t in tokens] == pytest.approx(want.logprobs_arms["help"], abs=1e-5)
    assert [t.token for t in tokens] == [engine.tokenizer.decode([i]) for i in want.token_ids]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_whole_chat_completion_carries_usage_and_what_it_was_decoded_with(client, engine):
    w = {"harm": 2.0}
    r = client.chat.completions.create(model=engine.profile.name, messages=MESSAGES, max_tokens=6, seed=1,
                                       temperature=0, extra_body={"weights": w})
    want = engine.generate(MESSAGES, full(engine, w), SamplingOptions(temperature=0, top_p=0.9, max_new_tokens=6))
    assert r.choices[0].message.content == want.text and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == len(engine.encode(MESSAGES))
    assert r.genarm["weights"] == full(engine, w) and r.genarm["options"]["seed"] == 1


def test_n_choices_are_independent_samples_with_seed_plus_i(client, engine):
    r = client.chat.completions.create(model=engine.profile.name, messages=MESSAGES, max_tokens=16, seed=5, n=2,
                                       temperature=1.0, top_p=1.0, extra_body={"weights": {"help": 1.0}})
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    opts = SamplingOptions(temperature=1.0, top_p=1.0, max_new_tokens=16)
    want = [engine.generate(MESSAGES, full(engine, {"help": 1.0}), SamplingOptions(**{**opts.as_dict(), "seed": s})).text
            for s in (5, 6)]
    assert texts == want and texts[0] != texts[1]
    assert r.genarm["seeds"] == [5, 6]


def test_without_a_seed_each_request_draws_its_own(client, engine):
    texts = {client.chat.completions.create(model=engine.profile.name, messages=MESSAGES, max_tokens=12,
                                            temperature=1.0, top_p=1.0).choices[0].message.content for _ in range(3)}
    assert len(texts) > 1


def test_a_streamed_completion_continues_the_raw_text(client, engine):
    text = "Once upon a time"
    chunks = list(client.completions.create(model=engine.profile.name, prompt=text, max_tokens=8, seed=2,
                                            stream=True, logprobs=0, extra_body={"weights": {"harm": 1.0}}))
    want = Completion()
    ids = prompt_ids(engine.tokenizer, text, chat_template=False)
    for step in engine.stream_ids([ids], [full(engine, {"harm": 1.0})],
                                  SamplingOptions(top_p=0.9, max_new_tokens=8, seed=2)):
        for ev in step:
            want.add(ev)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [i for c in chunks if c.choices[0].logprobs for i in c.choices[0].logprobs.token_ids] == want.token_ids
    whole = client.completions.create(model=engine.profile.name, prompt=text, max_tokens=8, seed=2, logprobs=0,
                                      extra_body={"weights": {"harm": 1.0}})
    lp = whole.choices[0].logprobs
    assert lp.token_ids == want.token_ids and lp.token_logprobs == pytest.approx(want.logprobs_fused, abs=1e-5)
    assert lp.arm_logprobs["harm"] == pytest.approx(want.logprobs_arms["harm"], abs=1e-5)
    assert lp.text_offset[0] == 0 and len(lp.tokens) == 8


@pytest.mark.parametrize("fields,param,message", [
    ({"max_tokens": 5000}, "max_tokens", "max_tokens: expected a whole number in [1, 512] on this server"),
    ({"temperature": -1}, "temperature", "temperature: expected a finite number >= 0"),
    ({"temperature": 3}, "temperature", "temperature: expected a number in [0, 2.0] on this server"),
    ({"top_p": 2}, "top_p", "top_p: expected a number in (0, 1]"),
    ({"seed": -1}, "seed", "seed: expected an integer in"),
    ({"stop": [1, 2]}, "stop", "stop: expected a list of strings"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop: expected at most 4 strings"),
    ({"n": 9}, "n", "n: expected an integer in [1, 4]"),
    ({"top_logprobs": 3, "logprobs": True}, "top_logprobs", "top_logprobs: only 0 is supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "frequency_penalty: not supported"),
    ({"messages": []}, "messages", "messages: expected text or a non-empty list of chat messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "messages[0].role: expected one of"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages", "messages: prompt is empty"),
    ({"messages": [{"role": "user", "content": "tea " * 400}]}, "messages", "exceeds the model's context"),
    ({"extra_body": {"weights": {"harmlessness": 2}}}, "weights",
     "weights: unknown ARM(s) harmlessness; this profile's ARMs: help, harm, small"),
    ({"extra_body": {"weights": {"help": "lots"}}}, "weights", "weights: weight of 'help': expected a number"),
    ({"extra_body": {"top_k": -2}}, "top_k", "top_k: expected an integer >= 0"),
    ({"extra_body": {"panes": [{}]}}, "panes", "unknown field(s) panes"),
    ({"extra_body": {"logit_bias": {"1": 2}}}, "logit_bias", "unknown field(s) logit_bias"),
])
def test_bad_fields_get_400_naming_the_field(client, engine, fields, param, message):
    kwargs = {"model": engine.profile.name, "messages": MESSAGES, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]


def test_a_model_not_offered_is_404_and_a_full_queue_429(client, engine, monkeypatch):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="tulu2-7b-genarm", messages=MESSAGES)
    assert e.value.body["param"] == "model" and "offered: tiny" in e.value.body["message"]
    monkeypatch.setattr(demo.requests, "MAX_WAITING", 0)  # the page's own limit on prompts waiting
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=engine.profile.name, messages=MESSAGES, max_tokens=4)
    assert "busy" in e.value.body["message"] and e.value.status_code == 429


def test_a_profile_that_cannot_load_is_503_and_bad_json_400(tiny, tmp_path):
    config = profile_dict(tiny["root"] / "base")
    config["profiles"]["hubonly"] = {"base": {"hub": "genarm-test/does-not-exist"}, "device": "cpu"}
    config["demo"] = ["tiny", "hubonly"]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    running = build_app(config_path=path, votes_path=tmp_path / "v.sqlite").serve_in_background()
    try:
        c = openai.OpenAI(base_url=running.url + "v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="hubonly", messages=MESSAGES)
        assert e.value.status_code == 503 and "cannot be loaded" in e.value.body["message"]
        r = httpx.post(running.url + "v1/chat/completions", content=b"{not json", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"] == "body: not valid JSON"
        r = httpx.get(running.url + "v1/embeddings", timeout=30)
        assert r.status_code == 404 and "no such route" in r.json()["error"]["message"]
    finally:
        running.stop()


def test_a_client_that_disconnects_mid_stream_frees_its_rows(served, client, engine):
    """Two streaming clients; one goes away after three chunks. Its rows leave the batch at once,
    and the other's answer is the one it would get alone."""
    app = served[0]
    assert wait_idle(app, engine)
    w = {"help": 1.0}
    other = {}

    def stay():
        chunks = client.chat.completions.create(model=engine.profile.name, messages=MESSAGES, max_tokens=60,
                                                seed=3, stream=True, extra_body={"weights": w})
        other["text"] = "".join(c.choices[0].delta.content or "" for c in chunks)

    thread = threading.Thread(target=stay)
    thread.start()
    steps = engine.scheduler.steps
    stream = client.chat.completions.create(model=engine.profile.name, messages=MESSAGES, max_tokens=200,
                                            seed=4, stream=True)
    for i, _ in zip(range(3), stream):
        pass
    assert engine.scheduler.rows_in_flight > 0
    stream.close()  # the client goes away without reading on
    thread.join(60)
    assert wait_idle(app, engine)
    assert engine.scheduler.steps - steps < 150  # the 200-token stream did not run to its end
    alone = engine.generate(MESSAGES, full(engine, w), SamplingOptions(top_p=0.9, max_new_tokens=60, seed=3))
    assert other["text"] == alone.text


def test_a_queued_client_that_disconnects_leaves_the_queue(served, engine, monkeypatch):
    """With the batch full, a waiting stream whose client goes away is dropped before it starts."""
    app, url, _ = served
    assert wait_idle(app, engine)
    monkeypatch.setattr(engine.core.scheduler, "max_rows", engine.models.rows_per_sequence)  # one sequence at a time
    run = engine.core.runner.run
    hold, opened, steps = threading.Event(), threading.Event(), threading.Semaphore(0)

    def gated_run(plan):  # once held, each step waits for the test's go: the first stream cannot end early
        if hold.is_set() and not opened.is_set():
            steps.acquire(timeout=30)
        return run(plan)
    monkeypatch.setattr(engine.core.runner, "run", gated_run)
    body = {"model": engine.profile.name, "messages": MESSAGES, "max_tokens": 150, "seed": 1, "stream": True}
    try:
        with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
            hold.set()
            with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=60) as queued:
                next(queued.iter_lines())  # its role chunk: it is admitted to the queue
                deadline = time.time() + 5
                while engine.scheduler.waiting == 0 and time.time() < deadline:
                    time.sleep(0.01)
                assert engine.scheduler.waiting == 1
            time.sleep(0.3 + 0.5)  # the server sees the queued client go (it polls for disconnects every 0.5 s)
            assert engine.scheduler.waiting == 1  # the engine is held: nothing has taken it yet
            steps.release()  # one step: the held one ends, the next drops the cancelled request and is held
            deadline = time.time() + 5
            while engine.scheduler.waiting and time.time() < deadline:
                time.sleep(0.02)
            assert engine.scheduler.waiting == 0
            assert not any(s.request.cancelled.is_set() for s in list(engine.core.runner.seqs))  # never admitted
    finally:
        opened.set()
        steps.release(5)
    assert wait_idle(app, engine)


def test_api_users_and_page_visitors_decode_in_one_batch(served, client, engine):
    app, _, gradio = served
    assert wait_idle(app, engine)
    stream = client.chat.completions.create(model=engine.profile.name, messages=MESSAGES, max_tokens=120, seed=1,
                                            stream=True)
    next(iter(stream))
    opts = SamplingOptions(temperature=0.0, top_p=0.9, max_new_tokens=120)
    job = gradio().submit(*run_inputs(engine.profile.name, PROMPT, opts, {"help": 1.0}, None, engine.arm_names,
                                      len(engine.arm_names)), api_name="/generate")
    seen, deadline = 0, time.time() + 30
    while seen < 2 and time.time() < deadline:
        seen = len({id(s.request) for s in list(engine.core.runner.seqs)})  # requests in the batch now
        time.sleep(0.005)
    job.cancel()
    stream.close()
    assert seen >= 2 and wait_idle(app, engine)


# ---- one schema, every surface --------------------------------------------------------------------
EXAMPLES = {"temperature": 0.35, "top_k": 5, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.1,
            "no_repeat_ngram_size": 2, "max_new_tokens": 7, "seed": 11, "normalised": True, "stop": ("zzz",)}


@pytest.fixture(scope="module")
def examples():
    """A value other than the default for every SamplingOptions field (inside the page's controls)."""
    assert set(EXAMPLES) == set(SAMPLING_NAMES), "give every SamplingOptions field an example value here"
    opts = SamplingOptions(**EXAMPLES)
    assert all(getattr(opts, n) != getattr(SamplingOptions(), n) for n in SAMPLING_NAMES)
    return opts


def test_every_option_reaches_the_cli(examples):
    argv = ["generate", "--prompt", "hi"]
    for name in SAMPLING_NAMES:
        flag, value = "--" + name.replace("_", "-"), getattr(examples, name)
        argv += [flag] if value is True else [a for v in value for a in (flag, v)] if isinstance(value, tuple) \
            else [flag, str(value)]
    args = build_parser().parse_args(argv)
    assert sampling_options(args, parse_config(profile_dict("x")).profile()) == examples


def test_every_option_reaches_profile_defaults(examples):
    config = profile_dict("x", defaults={**EXAMPLES, "stop": list(EXAMPLES["stop"])})
    assert parse_config(config).profile().defaults == examples


def test_every_option_reaches_the_page(served, engine, examples):
    app, _, gradio = served
    assert list(app.context.ui.sampling) == list(SAMPLING_NAMES)
    final = gradio().predict(*run_inputs(engine.profile.name, PROMPT, examples, {"help": 1.0}, None,
                                         engine.arm_names, len(engine.arm_names)), api_name="/generate")
    assert "Done" in final[6]
    download = final[10]
    record = json.loads(Path(download if isinstance(download, str) else download["value"]).read_text())
    assert record["options"] == examples.as_dict()


def test_every_option_reaches_the_gradio_api(served, examples):
    got = served[2]().predict(prompt=PROMPT, **examples.as_dict(), api_name="/generate_json")
    assert got["options"] == examples.as_dict()


def test_every_option_reaches_the_openai_routes(client, engine, examples):
    standard = {"temperature", "top_p", "seed", "stop"}  # OpenAI's own parameters; the rest go in the body
    given = examples.as_dict()
    tokens = given.pop("max_new_tokens")
    for create, prompt in ((client.chat.completions.create, {"messages": MESSAGES}),
                           (client.completions.create, {"prompt": PROMPT})):
        r = create(model=engine.profile.name, max_tokens=tokens, **prompt,
                   **{k: v for k, v in given.items() if k in standard},
                   extra_body={k: v for k, v in given.items() if k not in standard})
        assert r.genarm["options"] == examples.as_dict()
