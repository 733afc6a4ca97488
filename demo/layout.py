"""The page: its components (Layout), and the wiring of events to the handlers."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import gradio as gr

from genarm_core import Engine, SamplingOptions
from genarm_core.request import SAMPLING_NAMES
from genarm_core.votes import VoteStore

from . import handlers as h
from . import server
from .engines import Engines, read_profiles
from .render import EXAMPLES, HOW_IT_WORKS, LEGEND, runtime_markdown, tradeoff_assets
from .requests import MAX_NEW_TOKENS, MAX_STOP, to_page
from .session import Session

STREAMS = 32  # streaming requests served at once (the scheduler batches them; see engine.py)


@dataclass
class Layout:
    """Every component a handler reads or updates."""
    banner: gr.Markdown
    runtime: gr.Markdown  # how the profile runs on this machine
    session: gr.State
    prompt: gr.Textbox
    profile: gr.Dropdown
    compare: gr.Checkbox
    live: gr.Checkbox
    sampling: dict  # SamplingOptions field name -> component, in SamplingOptions' order
    sliders_a: list
    sliders_b: list
    weights_a_title: gr.Markdown
    col_weights_b: gr.Column
    buttons: dict  # generate, stop, regenerate
    status: gr.Markdown
    pane_html: dict  # base, a, b
    pane_stats: dict
    pane_text: dict  # the answers as plain text, with a copy button
    download: gr.DownloadButton
    follow_up: gr.Textbox
    follow_button: gr.Button
    vote_help: gr.Radio
    vote_harm: gr.Radio
    vote_button: gr.Button
    vote_status: gr.Markdown
    a_title: gr.Markdown
    col_b: gr.Column
    points: gr.Slider
    sweep_button: gr.Button
    sweep_status: gr.Markdown
    plot: gr.ScatterPlot

    @property
    def run_inputs(self) -> list:
        """The inputs of the page's runs (demo.requests.RunRequest)."""
        return [self.profile, self.prompt, self.compare, *self.sampling.values(), *self.sliders_a, *self.sliders_b]

    @property
    def run_outputs(self) -> list:
        """What a run updates; the first seven are the API's (panes' HTML, stats, status)."""
        return [*self.pane_html.values(), *self.pane_stats.values(), self.status, *self.pane_text.values(),
                self.download, self.follow_up]


@dataclass
class App:
    """The page and what it serves, for launching and for tests."""
    blocks: gr.Blocks
    engines: Engines
    active: weakref.WeakSet  # streams in flight, all sessions
    context: h.Context

    def launch(self, server_name: str = "127.0.0.1", server_port: int = 7860):
        """Serves the page and the OpenAI-compatible routes until interrupted."""
        server.serve(self, server_name, server_port)

    def serve_in_background(self, host: str = "127.0.0.1", port: int = 0) -> server.Running:
        """The same server on a background thread (tests, scripts): its URL and stop()."""
        return server.serve_in_background(self, host, port)


def _sampling(d) -> dict:
    """The Sampling accordion: one component per SamplingOptions field, keyed in its order (the order
    of the runs' inputs); a field without a component here fails at start-up."""
    parts = {
        "temperature": gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature (0 = greedy)"),
        "top_p": gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="Top-p"),
        "max_new_tokens": gr.Slider(1, MAX_NEW_TOKENS, value=d.max_new_tokens, step=1, label="Max new tokens"),
        "seed": gr.Number(d.seed, precision=0, label="Seed"),
        "normalised": gr.Checkbox(d.normalised, label="Normalised: divide the score by 1 + sum of weights",
                                  info="No sharpening as weights grow (keeps long answers from looping), "
                                       "but harmful requests are declined less often."),
        "repetition_penalty": gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.05,
                                        label="Repetition penalty (1 = off)"),
        "no_repeat_ngram_size": gr.Slider(0, 8, value=d.no_repeat_ngram_size, step=1,
                                          label="No-repeat n-gram size (0 = off)",
                                          info="Bans a token that would repeat an n-gram of the context"),
        "min_p": gr.Slider(0.0, 0.5, value=d.min_p, step=0.01, label="Min-p (0 = off)"),
        "top_k": gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k (0 = off)"),
        "stop": gr.Textbox(to_page("stop", d.stop), lines=2, max_lines=MAX_STOP,
                           label=f"Stop strings (one per line, at most {MAX_STOP})",
                           info="The answer ends before the first of them (not shown)"),
    }
    missing = set(SAMPLING_NAMES) - set(parts)
    assert not missing, f"the Sampling accordion has no component for {sorted(missing)}"
    return {name: parts[name] for name in SAMPLING_NAMES}


def _controls(profiles: dict, default: str, eng: Engine | None, n_sliders: int) -> dict:
    """The right-hand column: profile, weight sliders A and B, compare / live, sampling."""
    c = {"profile": gr.Dropdown(list(profiles), value=default, label="Profile (models)", visible=len(profiles) > 1),
         "weights_a_title": gr.Markdown("**Weights**")}
    c["sliders_a"] = [gr.Slider(step=0.1, elem_classes=["genarm-w-a"], **h.slider_props(eng, i)) for i in range(n_sliders)]
    with gr.Column(visible=False) as c["col_weights_b"]:
        gr.Markdown("**Weights B**")
        c["sliders_b"] = [gr.Slider(step=0.1, elem_classes=["genarm-w-b"], **h.slider_props(eng, i))
                          for i in range(n_sliders)]
    with gr.Row():
        c["compare"] = gr.Checkbox(False, label="Compare two weight settings (A and B)")
        c["live"] = gr.Checkbox(False, label="Live: apply slider moves to the running answer")
    with gr.Accordion("Sampling", open=False):
        c["sampling"] = _sampling(eng.profile.defaults if eng else SamplingOptions(top_p=0.9))
    return c


def _panes() -> dict:
    p = {"status": gr.Markdown("", elem_id="status"), "pane_html": {}, "pane_stats": {}, "pane_text": {}}
    gr.HTML(LEGEND)
    with gr.Row(equal_height=False):
        for key, title in (("base", "#### Base (no guidance)"), ("a", "#### GenARM (your weights)"),
                           ("b", "#### GenARM B")):
            with gr.Column(visible=key != "b") as column:
                md = gr.Markdown(title)
                p["pane_html"][key] = gr.HTML(elem_id=f"pane-{key}")
                p["pane_stats"][key] = gr.Markdown(elem_id=f"stats-{key}")
                p["pane_text"][key] = gr.Textbox(label="Plain text", lines=2, max_lines=6, interactive=False,
                                                 buttons=["copy"], elem_id=f"text-{key}")
            if key == "a":
                p["a_title"] = md
            if key == "b":
                p["col_b"] = column
    with gr.Row():
        p["follow_up"] = gr.Textbox(label="Follow-up", placeholder="Ask a follow-up: each pane continues its own "
                                    "conversation", scale=4)
        p["follow_button"] = gr.Button("Ask follow-up", scale=1)
        p["download"] = gr.DownloadButton("Download this run (JSON)", visible=False, scale=1)
    return p


def _votes() -> dict:
    gr.Markdown("#### Which answer is better? Left: Base (or A when comparing); right: GenARM (or B). "
                "Votes become preference pairs for training the next ARMs (`python -m genarm_core votes export`).")
    choices = list(h.VOTE_CHOICES)
    with gr.Row():
        v = {"vote_help": gr.Radio(choices, label="More helpful", elem_id="vote-help"),
             "vote_harm": gr.Radio(choices, label="More harmless", elem_id="vote-harm"),
             "vote_button": gr.Button("Submit vote", elem_id="vote-submit")}
    v["vote_status"] = gr.Markdown("", elem_id="vote-status")
    return v


def _tradeoff_tab() -> dict:
    png, text = tradeoff_assets()
    gr.Markdown("### Helpfulness vs harmlessness\nEach point is one setting, placed by the mean of the "
                "helpfulness and harmlessness judges over held-out prompts (GenARM weight settings, and "
                "the baselines a user would try instead).")
    if png:
        gr.Image(png, label="Precomputed trade-off", interactive=False)
    gr.Markdown(text)
    gr.Markdown("#### Sweep the weights on your prompt\nDecodes the prompt of the *Steer* tab under a grid "
                "of weights of the first two ARMs (others off), a few settings per batch, at most 64 tokens "
                "each, with the sampling settings of the *Steer* tab. Each point is placed by the answer's "
                "trajectory reward under each reward model.")
    with gr.Row():
        points = gr.Slider(2, 5, value=3, step=1, label="Grid points per ARM")
        button = gr.Button("Sweep weights", variant="primary")
    plot = gr.ScatterPlot(x="x", y="y", color="setting", tooltip=["setting", "answer"], label="Rewards per weight "
                          "setting (hover a point for its answer)", height=420)
    return {"points": points, "sweep_button": button, "sweep_status": gr.Markdown("", elem_id="sweep-status"),
            "plot": plot}


def _page(profiles: dict, default: str, eng: Engine | None, note: str, n_sliders: int) -> Layout:
    gr.Markdown("# GenARM: steer a language model with reward models, token by token\nType a request, move "
                "the reward weights and compare the guided answer with the unguided base model. See *How it "
                "works* below.")
    parts = {"banner": gr.Markdown(note), "session": gr.State(Session(), delete_callback=Session.stop)}
    with gr.Tab("Steer"):
        with gr.Row():
            with gr.Column(scale=3):
                parts["prompt"] = gr.Textbox(label="Prompt", lines=3, placeholder="Ask something…", value=EXAMPLES[0])
                gr.Examples(EXAMPLES, inputs=parts["prompt"], label="Examples: everyday requests and harmful requests")
                with gr.Row():
                    parts["buttons"] = {"generate": gr.Button("Generate", variant="primary"),
                                        "stop": gr.Button("Stop", variant="stop"),
                                        "regenerate": gr.Button("Regenerate")}
            with gr.Column(scale=2):
                parts.update(_controls(profiles, default, eng, n_sliders))
        parts.update(_panes())
        parts.update(_votes())
        gr.Markdown(HOW_IT_WORKS)
        with gr.Accordion("How this profile runs on this machine", open=False):
            parts["runtime"] = gr.Markdown(runtime_markdown(eng), elem_id="runtime")
    with gr.Tab("Trade-off"):
        parts.update(_tradeoff_tab())
    return Layout(**parts)


def _wire(ctx: h.Context):
    """The page's events (undocumented: the page's own, not an API; hidden from view_api) and the
    one named API, /generate_json. Every decoding event shares one concurrency group of STREAMS
    (a group takes the lowest limit of its events, so each one names it)."""
    ui, bind = ctx.ui, partial
    decode = dict(concurrency_id="decode", concurrency_limit=STREAMS)
    page, private = dict(api_visibility="undocumented"), dict(api_visibility="private")
    fast = dict(concurrency_limit=None, queue=False)
    inputs, outputs = [ui.session, *ui.run_inputs], ui.run_outputs
    ui.buttons["generate"].click(bind(h.generate, ctx), inputs, outputs, api_name="generate", **page, **decode)
    ui.prompt.submit(bind(h.generate, ctx), inputs, outputs, **private, **decode)
    ui.buttons["stop"].click(h.stop, ui.session, None, api_name="stop", **page, **fast)
    ui.buttons["regenerate"].click(h.next_seed, ui.sampling["seed"], ui.sampling["seed"], concurrency_limit=None,
                                   **private).then(bind(h.generate, ctx), inputs, outputs, **private, **decode)
    gr.Button(visible=False).click(bind(h.steer, ctx), inputs, outputs, api_name="steer", **page, **decode)
    live_inputs = [ui.session, ui.live, ui.profile, ui.sampling["normalised"], *ui.sliders_a, *ui.sliders_b]
    gr.Button(visible=False).click(bind(h.live_update, ctx), live_inputs, None, api_name="live_weights",
                                   **page, **fast)
    for slider in [*ui.sliders_a, *ui.sliders_b]:
        slider.release(h.cancel_for_release, [ui.session, ui.live], None, **private, **fast).then(
            bind(h.on_release, ctx), [ui.session, ui.live, *ui.run_inputs], outputs, **private, **decode)
        slider.input(bind(h.live_update, ctx), live_inputs, None, show_progress="hidden", **private, **fast)
    ui.compare.change(bind(h.toggle_compare, ctx), ui.compare, [ui.col_b, ui.col_weights_b, ui.a_title,
                                                                ui.weights_a_title], **private, queue=False)
    ui.profile.change(bind(h.change_profile, ctx), [ui.session, ui.profile],
                      [ui.banner, ui.runtime, *ui.sliders_a, *ui.sliders_b, *ui.sampling.values(), *outputs],
                      **private)
    ui.sweep_button.click(bind(h.sweep, ctx), [ui.profile, ui.prompt, *ui.sampling.values(), ui.points],
                          [ui.plot, ui.sweep_status], api_name="sweep", **page, **decode)
    follow = [ui.session, ui.follow_up, *ui.run_inputs]
    ui.follow_button.click(bind(h.follow_up, ctx), follow, outputs, api_name="follow_up", **page, **decode)
    ui.follow_up.submit(bind(h.follow_up, ctx), follow, outputs, **private, **decode)
    ui.vote_button.click(bind(h.vote, ctx), [ui.session, ui.vote_help, ui.vote_harm],
                         [ui.vote_status, ui.vote_help, ui.vote_harm], api_name="vote", concurrency_limit=None, **page)
    gr.api(h.json_endpoint(ctx), api_name="generate_json", **decode)


def build_app(engine: Engine | None = None, config_path=None, votes_path=None) -> App:
    """The demo on the offered profiles of models.yaml (or on one given engine, for tests);
    votes go to votes_path (default: $GENARM_VOTES or ~/.cache/genarm/votes.sqlite)."""
    profiles, default, config_error = read_profiles(engine, config_path)
    engines = Engines(profiles, engine, default)
    first, note = engines.get(default) if default else (None, "")
    n_sliders = max([1, *(len(p.arms) for p in profiles.values())])
    with gr.Blocks(title="GenARM steering demo") as blocks:
        ui = _page(profiles, default, first, config_error or note, n_sliders)
        ctx = h.Context(ui, engines, n_sliders, weakref.WeakSet(), VoteStore(votes_path))
        _wire(ctx)
    blocks.queue(default_concurrency_limit=4, max_size=4 * STREAMS)
    return App(blocks, engines, ctx.active, ctx)


def build_demo(engine: Engine | None = None, config_path=None, votes_path=None) -> gr.Blocks:
    return build_app(engine, config_path, votes_path).blocks
