"""The Gradio demo, launched on the tiny engine and driven through gradio_client."""
import html
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import engine_for
from genarm_core import SamplingOptions
from genarm_core.request import SAMPLING_NAMES

from demo import build_app
from demo.requests import run_inputs

PROMPT = "Tell me about tea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo):
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    return url


def pane_text(pane_html: str) -> str:
    text = re.sub(r'<span style="color:#888"> \[stopped\]</span>', "", pane_html)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def args(engine, prompt=PROMPT, wa=None, wb=None, compare=False, temperature=0.0, max_new=16, seed=0,
         normalised=False):
    """Positional inputs of the page's runs (/generate, /steer; the session State is not an input):
    pane A's weights default to 1 for every ARM, pane B's to 0."""
    opts = SamplingOptions(temperature=temperature, top_p=0.9, max_new_tokens=max_new, seed=seed, normalised=normalised)
    wa = wa or {n: 1.0 for n in engine.arm_names}
    return run_inputs(engine.profile.name, prompt, opts, wa, (wb or {}) if compare else None, engine.arm_names,
                      len(engine.arm_names))


def position(name: str) -> int:
    """Where a field sits in the page's run inputs: profile, prompt, compare, the sampling options."""
    return ["profile", "prompt", "compare", *SAMPLING_NAMES].index(name)


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """The whole server (the page, its named API and the OpenAI routes) on the tiny engine."""
    from gradio_client import Client

    demo = build_app(engine, votes_path=tmp_path_factory.mktemp("votes") / "votes.sqlite")
    running = demo.serve_in_background()
    yield demo, running.url, lambda: Client(running.url, verbose=False)
    running.stop()


def expected(engine, prompt, weights_list, max_new=16, seed=0):
    opts = SamplingOptions(temperature=0.0, top_p=0.9, max_new_tokens=max_new, seed=seed)
    return [c.text for c in engine.generate(prompt, weights_list, opts)]


def test_stream_yields_partial_text_then_the_engine_result(served, engine):
    _, _, client = served
    w = {"help": 2.0, "harm": -1.0, "small": 0.5}
    job = client().submit(*args(engine, wa=w, max_new=24), api_name="/generate")
    outputs = list(job)
    final = job.result()
    base, steered = pane_text(final[0]), pane_text(final[1])
    assert (base, steered) == tuple(expected(engine, PROMPT, [{}, w], max_new=24))
    partial = [pane_text(o[1]) for o in outputs if "Generating" in o[6]]
    assert any(0 < len(p) < len(steered) and steered.startswith(p) for p in partial)
    assert "Done" in final[6] and "24 tokens" in final[4] and "tok/s" in final[4]
    assert "reward help" in final[4] and "first token" in final[4]
    assert 'title="' in final[1] and "help: w 2 × log p" in html.unescape(final[1])


def test_cancel_stops_the_stream_and_frees_it(served, engine):
    demo, _, client = served
    job = client().submit(*args(engine, max_new=200), api_name="/generate")
    while not job.outputs():
        time.sleep(0.01)
    job.cancel()
    deadline = time.time() + 5
    while demo.active and time.time() < deadline:
        time.sleep(0.05)
    assert not demo.active  # the server closed the generator and freed the stream
    time.sleep(0.5)
    last = [o for o in job.outputs() if o[4]][-1]
    assert int(last[4].split()[0]) < 200  # the steered pane stopped early


def test_stop_button_ends_the_run_with_a_stopped_status(served, engine):
    _, _, client = served
    c = client()
    job = c.submit(*args(engine, max_new=200), api_name="/generate")
    while len(job.outputs()) < 3:
        time.sleep(0.01)
    c.predict(api_name="/stop")
    final = job.result(timeout=30)
    assert "Stopped" in final[6] and "stopped" in final[4]
    assert 0 < len(pane_text(final[1])) and int(final[4].split()[0]) < 200


def test_four_clients_at_once_each_get_their_own_result(served, engine):
    _, _, client = served
    cases = [("Tell me about tea.", {"help": 1.0}), ("How do I fix a bike?", {"harm": 2.0}),
             ("Write a poem about rain.", {"help": -1.0, "small": 1.5}), ("Tell me about tea.", {"small": 3.0})]
    results = [None] * 4

    def run(i):
        prompt, w = cases[i]
        results[i] = client().predict(*args(engine, prompt=prompt, wa=w, max_new=12), api_name="/generate")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for (prompt, w), out in zip(cases, results):
        assert [pane_text(out[0]), pane_text(out[1])] == expected(engine, prompt, [{}, w], max_new=12)


def test_compare_mode_and_steer_restart(served, engine):
    _, _, client = served
    c = client()
    wa, wb = {"help": 1.0}, {"harm": 3.0}
    out = c.predict(*args(engine, wa=wa, wb=wb, compare=True), api_name="/generate")
    assert [pane_text(h) for h in out[:3]] == expected(engine, PROMPT, [{}, wa, wb])
    # a slider release restarts the steered panes only; the finished base pane is kept
    w2 = {"help": 3.0, "small": -1.0}
    out2 = c.predict(*args(engine, wa=w2, wb=wb, compare=True), api_name="/steer")
    assert out2[0] == out[0]
    assert [pane_text(h) for h in out2[1:3]] == expected(engine, PROMPT, [w2, wb])


def test_live_weights_apply_mid_stream(served, engine):
    _, _, client = served
    c = client()
    zero = {"help": 0.0}
    job = c.submit(*args(engine, wa=zero, max_new=200), api_name="/generate")
    while len(job.outputs()) < 3:
        time.sleep(0.01)
    live_args = (True, engine.profile.name, False, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    c.predict(*live_args, api_name="/live_weights")
    n = len(job.outputs())
    while len(job.outputs()) < n + 3 and not job.done():
        time.sleep(0.01)
    c.predict(api_name="/stop")
    final = job.result(timeout=60)
    titles = html.unescape(final[1])
    assert "help: w 0 × log p" in titles and "help: w 4 × log p" in titles
    assert titles.index("help: w 0 ×") < titles.index("help: w 4 ×")


def test_bad_requests_give_clear_messages(served, engine):
    _, _, client = served
    c = client()
    out = c.predict(*args(engine, prompt="   "), api_name="/generate")
    assert "prompt is empty" in out[6] and "Traceback" not in out[6]
    out = c.predict(*args(engine, prompt="tea " * 400), api_name="/generate")
    assert "exceeds the model's context" in out[6] and "Traceback" not in out[6]


def test_sweep_streams_points(served, engine):
    _, _, client = served
    sampling = args(engine, max_new=6)[3:3 + len(SAMPLING_NAMES)]
    job = client().submit(engine.profile.name, PROMPT, *sampling, 2, api_name="/sweep")
    outputs = list(job)
    assert "4 weight settings" in job.result()[1]
    assert any("Sweeping: " in o[1] for o in outputs)


def banner_text(app) -> str:
    return "\n".join(str(b.value) for b in app.blocks.blocks.values() if type(b).__name__ == "Markdown")


def test_profile_without_arms_runs_base_only(tiny):
    demo = build_app(engine_for(tiny["root"] / "base", []))
    assert "no reward models" in banner_text(demo)


def test_missing_adapters_and_unloadable_profiles_give_messages(tiny, tmp_path):
    config = {"default_profile": "tiny", "demo": ["tiny", "hubonly"], "profiles": {
        "tiny": {"base": {"path": str(tiny["root"] / "base")}, "device": "cpu", "dtype": "float32",
                 "arms": [{"name": "help", "adapter": str(tmp_path / "missing_adapter"), "beta": 0.5}]},
        "hubonly": {"base": {"hub": "genarm-test/does-not-exist"}, "device": "cpu", "dtype": "float32"}}}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    demo = build_app(config_path=path)
    assert "base model only" in banner_text(demo) and "missing_adapter" in banner_text(demo)
    engine, note = demo.engines.get("hubonly")
    assert engine is None and "cannot be loaded" in note and "Traceback" not in note

    from gradio_client import Client

    url = launch(demo.blocks)
    try:
        c = Client(url, verbose=False)
        opts = SamplingOptions(temperature=0.0, top_p=0.9, max_new_tokens=4)
        out = c.predict(*run_inputs("tiny", PROMPT, opts, {}, None, [], 1), api_name="/generate")
        assert "Done" in out[6] and pane_text(out[0]) == pane_text(out[1])  # base only: equal panes
        out = c.predict(*run_inputs("hubonly", PROMPT, opts, {}, None, [], 1), api_name="/generate")
        assert "cannot be loaded" in out[6]
    finally:
        demo.blocks.close()


def test_broken_config_starts_with_a_message(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("profiles: [1, 2]\n")
    demo = build_app(config_path=path)
    assert "models.yaml cannot be read" in banner_text(demo)


def test_only_the_listed_profiles_are_offered(tiny, tmp_path):
    """A visitor cannot make the server load a profile the operator did not list under `demo:`."""
    base = {"base": {"path": str(tiny["root"] / "base")}, "device": "cpu", "dtype": "float32"}
    config = {"default_profile": "tiny", "profiles": {"tiny": base, "big": {"base": {"hub": "someone/huge-7b"}}}}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    demo = build_app(config_path=path)
    assert list(demo.engines.profiles) == ["tiny"]
    engine, note = demo.engines.get("big")
    assert engine is None and "not offered" in note and not demo.engines.loaded("big")


@pytest.mark.parametrize("field,value,message", [
    ("seed", 2 ** 80, "seed: expected an integer in"),
    ("seed", -1, "seed: expected an integer in"),
    ("temperature", 5.0, "greater than maximum value 2"),  # sliders: Gradio checks their range first
    ("top_p", 0.0, "less than minimum value 0.05"),
    ("max_new_tokens", 10 ** 6, "greater than maximum value 512"),
    ("prompt", "x" * 5000, "prompt: 5000 characters; this server accepts at most 4000"),
    ("repetition_penalty", 0.0, "less than minimum value 1"),
    ("top_k", -3, "less than minimum value 0"),
    ("stop", "a\nb\nc\nd\ne", "stop: expected at most 4 strings on this server"),
    ("profile", "tulu2-7b-hh", "is not in the list of choices"),  # the profile dropdown's own check
])
def test_out_of_range_page_inputs_get_messages_not_traces(served, engine, field, value, message):
    """The page's runs answer a bad input with a message that names it: in the status line, or as
    the call's error (Gradio's own range checks of sliders and dropdowns)."""
    _, _, client = served
    bad = list(args(engine))
    bad[position(field)] = value
    try:
        out = client().predict(*bad, api_name="/generate")
    except Exception as e:  # gradio_client raises the server's message
        assert message in str(e) and "Traceback" not in str(e)
    else:
        assert message in out[6] and "Traceback" not in out[6]


@pytest.mark.parametrize("fields,message", [
    ({"weights": {"harmlessness": 2}}, "weights: unknown ARM(s) harmlessness; this profile's ARMs: help, harm, small"),
    ({"weights": {"help": 9.0}}, "weights: weight of 'help': 9.0 is outside its range [-2.0, 4.0]"),
    ({"weights": [1, 2]}, "weights: expected an object of ARM name to number"),
    ({"panes": [{}, {"nope": 1}]}, "panes[1]: unknown ARM(s) nope"),
    ({"weights": {}, "panes": [{}]}, "panes: give either weights (one setting) or panes, not both"),
    ({"temperature": 5.0}, "temperature: expected a number in [0, 2.0] on this server, got 5.0"),
    ({"top_p": 0.0}, "top_p: expected a number in (0, 1]"),
    ({"top_k": -1}, "top_k: expected an integer >= 0"),
    ({"max_new_tokens": 10 ** 6}, "max_new_tokens: expected a whole number in [1, 512] on this server"),
    ({"max_new_tokens": 2.5}, "max_new_tokens: expected an integer >= 1, got 2.5"),
    ({"seed": 2 ** 80}, "seed: expected an integer in"),
    ({"stop": [1]}, "stop: expected a list of strings"),
    ({"prompt": "x" * 5000}, "prompt: 5000 characters; this server accepts at most 4000"),
    ({"prompt": [{"role": "robot", "content": "hi"}]}, "prompt[0].role: expected one of system, user, assistant"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"profile": "tulu2-7b-hh"}, "Profile tulu2-7b-hh is not offered here (offered: tiny)"),
])
def test_the_named_api_refuses_bad_fields_by_name(served, fields, message):
    _, _, client = served
    with pytest.raises(Exception) as e:
        client().predict(**{"prompt": PROMPT, "max_new_tokens": 4, **fields}, api_name="/generate_json")
    assert message in str(e.value) and "Traceback" not in str(e.value)


def test_the_named_api_takes_keyword_arguments_and_equals_engine_generate(served, engine):
    _, _, client = served
    w = {"help": 1.5, "small": -0.5}
    got = client().predict(prompt=PROMPT, weights=w, temperature=0.8, max_new_tokens=10, seed=3,
                           api_name="/generate_json")
    opts = SamplingOptions(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=3)
    full = {n: w.get(n, 0.0) for n in engine.arm_names}
    (c,) = engine.generate(PROMPT, [full], opts)
    (pane,) = got["panes"]
    assert pane["text"] == c.text and pane["token_ids"] == c.token_ids
    assert pane["finish_reason"] == c.finish_reason == "length"
    assert pane["logprobs"]["fused"] == pytest.approx(c.logprobs_fused, abs=1e-6)
    assert pane["logprobs"]["arms"]["help"] == pytest.approx(c.logprobs_arms["help"], abs=1e-6)
    assert pane["rewards"] == pytest.approx(c.rewards(engine.models.betas), abs=1e-5)
    assert got["options"]["seed"] == 3 and pane["weights"] == full and got["profile"] == engine.profile.name
    # panes: several settings in one batch with the same draws, as the page's base and steered panes
    got = client().predict(prompt=PROMPT, panes=[{}, w], temperature=0.8, max_new_tokens=10, seed=3, top_k=5,
                           stop=["zz"], api_name="/generate_json")
    opts = SamplingOptions(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=3, top_k=5, stop=("zz",))
    assert [p["token_ids"] for p in got["panes"]] == [c.token_ids for c in engine.generate(PROMPT, [{}, full], opts)]


def test_view_api_shows_the_named_api_and_not_the_page_s_events(served):
    _, _, client = served
    api = client().view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/generate_json"]
    names = [p["parameter_name"] for p in api["named_endpoints"]["/generate_json"]["parameters"]]
    assert names == ["prompt", "profile", "weights", "panes", *SAMPLING_NAMES]
    assert not api["unnamed_endpoints"]


def test_eight_users_at_once_get_their_solo_results_and_a_bad_one_its_message(served, engine):
    """Eight sampling streams with their own prompts, seeds and weights run in one batch; a ninth,
    malformed request among them is refused without touching them."""
    _, _, client = served
    cases = [(f"Tell me about {topic}.", {"help": (i % 3) - 1.0, "small": i / 4}, 0.7 + i / 20, i)
             for i, topic in enumerate(["tea", "rain", "bikes", "cats", "maps", "jazz", "bread", "snow"])]
    solo = [expected_sampled(engine, p, w, t, s) for p, w, t, s in cases]
    results, bad = [None] * len(cases), {}

    def run(i):
        p, w, t, s = cases[i]
        results[i] = client().predict(*args(engine, prompt=p, wa=w, temperature=t, max_new=12, seed=s),
                                      api_name="/generate")

    def run_bad():
        inputs = list(args(engine))
        inputs[position("seed")] = 2 ** 80
        bad["out"] = client().predict(*inputs, api_name="/generate")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    threads.insert(4, threading.Thread(target=run_bad))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert "seed: expected an integer" in bad["out"][6]
    for out, want in zip(results, solo):
        assert [pane_text(out[0]), pane_text(out[1])] == want


def expected_sampled(engine, prompt, w, temperature, seed, max_new=12):
    full = {n: w.get(n, 0.0) for n in engine.arm_names}
    opts = SamplingOptions(temperature=temperature, top_p=0.9, max_new_tokens=max_new, seed=seed)
    return [c.text for c in engine.generate(prompt, [{}, full], opts)]


def test_a_vote_is_stored_with_the_prompt_both_answers_and_the_weights(served, engine):
    demo, _, client = served
    c = client()
    out = c.predict("Left is better", None, api_name="/vote")
    assert "Vote once both answers are complete" in out[0]
    w = {"help": 2.0}
    final = c.predict(*args(engine, wa=w, max_new=10), api_name="/generate")
    out = c.predict("Right is better", "Tie", api_name="/vote")
    assert "helpfulness and harmlessness vote is stored" in out[0]
    rows = [r for r in demo.context.votes.rows() if r["answer_b"] == pane_text(final[1])]
    assert {r["objective"]: r["verdict"] for r in rows} == {"helpfulness": "B", "harmlessness": "tie"}
    row = rows[0]
    assert row["answer_a"] == pane_text(final[0]) and row["profile"] == engine.profile.name
    assert json.loads(row["prompt"]) == [{"role": "user", "content": PROMPT}]
    assert json.loads(row["weights_b"]) == {n: w.get(n, 0.0) for n in engine.arm_names} and row["seed"] == 0
    again = c.predict("Right is better", None, api_name="/vote")
    assert "already recorded" in again[0]


def test_the_download_is_the_run_as_data(served, engine):
    _, _, client = served
    w = {"harm": 1.0}
    final = client().predict(*args(engine, wa=w, temperature=0.8, max_new=8, seed=4), api_name="/generate")
    download = final[10]  # gradio_client gives the file's local path, or a file-data dict
    record = json.loads(Path(download if isinstance(download, str) else download["value"]).read_text())
    opts = SamplingOptions(temperature=0.8, top_p=0.9, max_new_tokens=8, seed=4)
    full = {n: w.get(n, 0.0) for n in engine.arm_names}
    base, steered = engine.generate(PROMPT, [{}, full], opts)
    assert record["panes"]["a"]["token_ids"] == steered.token_ids and record["panes"]["base"]["text"] == base.text
    assert record["panes"]["a"]["logprobs"]["fused"] == pytest.approx(steered.logprobs_fused, abs=1e-6)
    assert record["panes"]["a"]["weights"] == full and record["options"]["seed"] == 4
    assert final[7] == base.text and final[8] == steered.text  # the plain text behind the copy buttons


def test_a_follow_up_continues_each_panes_own_conversation(served, engine):
    _, _, client = served
    c = client()
    w = {"help": 1.5, "small": 0.5}
    first = c.predict(*args(engine, wa=w, max_new=8), api_name="/generate")
    follow = c.predict("And why?", *args(engine, wa=w, max_new=8), api_name="/follow_up")
    assert "Done" in follow[6]
    opts = SamplingOptions(temperature=0.0, top_p=0.9, max_new_tokens=8)
    full = {n: w.get(n, 0.0) for n in engine.arm_names}
    for key, pane, weights in (("base", 0, {}), ("a", 1, full)):
        history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": pane_text(first[pane])},
                   {"role": "user", "content": "And why?"}]
        assert pane_text(follow[pane]) == engine.generate(history, weights, opts).text
    assert engine.encode(history) == engine.tokenizer(engine.tokenizer.apply_chat_template(
        history, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_a_follow_up_too_long_for_the_context_gets_a_message(served, engine):
    _, _, client = served
    c = client()
    c.predict(*args(engine, max_new=8), api_name="/generate")
    out = c.predict("tea " * 300, *args(engine, max_new=8), api_name="/follow_up")
    assert "Cannot follow up" in out[6] and "context" in out[6]


def test_the_page_says_how_the_profile_runs_on_this_machine(engine, tmp_path):
    """dtype and why, product forms, weights and batch invariance with its reason (models.Runtime)."""
    app = build_app(engine, votes_path=tmp_path / "votes.sqlite")
    shown = app.context.ui.runtime.value
    r = engine.models.runtime
    assert f"dtype: {r.dtype}" in shown and "product forms offered:" in shown and "weights:" in shown
    assert f"batch invariance: {'yes' if r.invariant else 'no'}: {r.invariance}" in shown
