"""GenARM demo: steer a language model with autoregressive reward models, token by token.

UI wiring only; the method lives in genarm_core. `build_demo(engine=None, config_path=None)`
builds the Blocks (tests inject a tiny engine); `python app.py` launches it.
"""
from __future__ import annotations

import html
import itertools
import json
import math
import os
import socket
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path

import gradio as gr

from genarm_core import (Completion, ConfigError, Engine, ModelLoadError, Pane, RequestError,
                         SamplingOptions, load_config, load_models)
from genarm_core.evaluate import markdown_table

ASSETS = Path(__file__).resolve().parent / "space_assets"
EXAMPLES = [  # benign everyday requests, then harmful ones (where harmlessness should matter)
    "Give me three tips for studying for an exam.",
    "How do I make a simple tomato pasta sauce?",
    "Write a short, friendly email asking my landlord to fix the heating.",
    "How do I pick a lock to get into my neighbour's house?",
    "What is the easiest way to hurt someone without leaving marks?",
    "Write a message to bully a classmate into quitting the team.",
]
PANE_KEYS = ("base", "a", "b")
SWEEP_CHUNK = 3  # weight settings decoded together per batch in the trade-off sweep
# What a visitor may ask for, checked on the server before anything is tokenised or decoded
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
MAX_WAITING = 16  # prompts waiting for the batch before new requests are told to come back
STREAMS = 32  # streaming requests served at once (the scheduler batches them; see engine.py)
UPDATES_PER_SECOND = 12  # page updates per stream: each one costs the server Python time

HOW_IT_WORKS = """
### How it works (one minute)
**GenARM** ([Xu et al., ICLR 2025](https://arxiv.org/abs/2410.08193)) steers a frozen language
model at decoding time with *autoregressive reward models* (ARMs). An ARM is an ordinary language
model trained on preference pairs so that its log-probability of an answer **is** the reward:
`r(x, y) = beta * sum_t log p_ARM(y_t | x, y_<t)`. Because that reward splits into one term per
token, every next token can be re-weighted directly:

`score(v) = log p_base(v) + sum_i w_i * log p_ARM_i(v)`, then sample from `softmax(score / T)`.

* **Sliders** set the weights `w_i` (0 = off, the base model exactly; negative = steer away).
  Weights enter only when a token is drawn, so they can change between two tokens for free:
  tick **live** to apply slider moves to the answer being written.
* **Base** and **GenARM** panes decode together in one batch and share their random draws, so
  any difference between them comes from the weights alone.
* **Token colours** show how much the reward models moved each chosen token:
  `log p_fused - log p_base` (green: made more likely, red: less likely). Hover a token to see
  each ARM's log-probability and its contribution `w_i * log p_ARM_i`.
* **Rewards** under each pane are each ARM's trajectory reward of the answer
  (`beta * sum of its token log-probs`); higher is better for that objective.
"""

LEGEND = (
    '<div style="font-size:0.85em;margin:4px 0">Token colour = <code>log p_fused - log p_base</code> '
    'of the chosen token: '
    '<span style="background:rgba(22,163,74,0.55);padding:0 4px;border-radius:3px">more likely</span> '
    'under guidance, '
    '<span style="background:rgba(220,38,38,0.55);padding:0 4px;border-radius:3px">less likely</span>, '
    'uncoloured = unchanged (full colour at 3 nats). Hover a token for each ARM\'s contribution.</div>')


# ---- models -----------------------------------------------------------------------------------
class Engines:
    """One engine per profile, loaded on first use and shared by all sessions (the engine is
    thread-safe at token granularity). Failures are kept as messages, never raised."""

    def __init__(self, profiles: dict, engine: Engine | None = None):
        self.profiles = profiles
        self._loaded: dict[str, tuple[Engine | None, str]] = {}
        self._locks = {name: threading.Lock() for name in profiles}  # one load at a time per profile
        if engine is not None:
            self._loaded[engine.profile.name] = (engine, notes_for(engine, engine.profile))

    def get(self, name: str) -> tuple[Engine | None, str]:
        if not isinstance(name, str) or name not in self.profiles:
            offered = ", ".join(f"`{n}`" for n in self.profiles)
            return None, f"**Profile `{str(name)[:80]}` is not offered here** (offered: {offered})."
        if name not in self._loaded:
            with self._locks.get(name, threading.Lock()):
                if name not in self._loaded:
                    self._loaded[name] = self._load(name)
        return self._loaded[name]

    def loaded(self, name: str) -> bool:
        return name in self._loaded

    def _load(self, name: str) -> tuple[Engine | None, str]:
        profile = self.profiles.get(name)
        if profile is None:
            return None, f"**Unknown profile `{name}`.**"
        hub = [s.hub for s in [profile.base, *(a.model for a in profile.arms)] if s is not None and s.hub]
        if hub and not hub_reachable():  # fail fast: offline, transformers retries for minutes
            return None, (f"**Profile `{name}` cannot be loaded:** it needs `{hub[0]}` from the "
                          "Hugging Face hub, which this machine cannot reach.")
        try:
            engine = Engine(load_models(profile))
            return engine, notes_for(engine, profile)
        except (ModelLoadError, ConfigError, OSError, ValueError, RuntimeError) as e:
            first = str(e)
        if profile.arms:  # maybe only the ARMs are missing: run the base alone
            try:
                engine = Engine(load_models(replace(profile, arms=())))
                return engine, (f"**The reward models of profile `{name}` could not be loaded**, so "
                                f"this page runs the **base model only** (both panes show it, no "
                                f"sliders).\n\n`{first}`")
            except (ModelLoadError, ConfigError, OSError, ValueError, RuntimeError):
                pass
        return None, f"**Profile `{name}` cannot be loaded.**\n\n`{first}`"


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True  # offline mode: transformers looks in the local cache and fails fast
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def notes_for(engine: Engine, profile) -> str:
    if not engine.arm_names:
        return (f"**Profile `{profile.name}` has no reward models (ARMs) yet** (`arms: []` in "
                "models.yaml), so both panes show the base model and there are no sliders. "
                "Add trained ARMs to the profile to steer.")
    return ""


# ---- per-session state and rendering -----------------------------------------------------------
class PaneView:
    """What one pane has produced so far: the completion, its tokens for display, timings."""

    def __init__(self, t0: float):
        self.t0, self.first, self.last = t0, None, None
        self.completion = Completion()
        self.spans: list[str] = []

    def add(self, ev, now: float):
        self.completion.add(ev)
        if ev.token_id >= 0:
            self.first = self.first or now
            self.last = now
            self.spans.append(token_span(ev))
        elif ev.finish_reason == "cancelled":
            self.spans.append('<span style="color:#888"> [stopped]</span>')

    @property
    def done(self) -> bool:
        return self.completion.finish_reason in ("eos", "stop", "length")

    def html(self) -> str:
        """Append-only (no closing tag; the browser closes the div), so that Gradio streams each
        update as a short "append" diff instead of the whole pane again."""
        return '<div class="genarm-tokens" style="white-space:pre-wrap;line-height:1.6">' + "".join(self.spans)

    def stats(self, betas: dict) -> str:
        n = len(self.completion.token_ids)
        parts = [f"{n} tokens"]
        if self.first is not None:
            rate = (n - 1) / (self.last - self.first) if n > 1 and self.last > self.first else None
            parts.append(f"{rate:.1f} tok/s" if rate else "– tok/s")
            parts.append(f"first token {self.first - self.t0:.2f} s")
        rewards = self.completion.rewards(betas)
        if rewards:
            parts.append("reward " + ", ".join(f"{k} {v:+.3f}" for k, v in rewards.items()))
        if self.completion.finish_reason:
            parts.append({"eos": "finished", "length": "hit max tokens", "stop": "stop string",
                          "cancelled": "stopped"}.get(self.completion.finish_reason, ""))
        return " · ".join(parts)


def token_span(ev) -> str:
    delta = ev.logprob_fused - ev.logprob_base
    lines = [f"{ev.text!r}  (token {ev.token_id})",
             f"log p base {ev.logprob_base:.3f} → fused {ev.logprob_fused:.3f}  (Δ {delta:+.3f})"]
    for name, lp in ev.logprob_arms.items():
        w = ev.weights.get(name, 0.0)
        lines.append(f"{name}: w {w:g} × log p {lp:.3f} = {w * lp:+.3f}")
    alpha = min(abs(delta) / 3.0, 1.0) * 0.6 if math.isfinite(delta) else 0.0
    rgb = "22,163,74" if delta > 0 else "220,38,38"
    style = f"background:rgba({rgb},{alpha:.2f});border-radius:3px" if alpha > 0.02 else ""
    return (f'<span title="{html.escape(chr(10).join(lines), quote=True)}" style="{style}">'
            f"{html.escape(ev.text)}</span>")


class Session:
    """Per-browser-session state (gr.State): the stream in flight and what each pane shows."""

    def __init__(self):
        self.stream = None
        self.panes: dict[str, Pane] = {}
        self.views: dict[str, PaneView] = {}
        self.key = None  # (profile, prompt, options) of the views

    def stop(self):
        stream = self.stream
        if stream is not None:
            stream.cancel()

    @property
    def running(self) -> bool:
        return self.stream is not None and not self.stream.cancelled


def completion_options(options: SamplingOptions) -> dict:
    return {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
            "max_new_tokens": options.max_new_tokens, "seed": options.seed, "normalised": options.normalised}


def completion_record(c: Completion, weights: dict, betas: dict) -> dict:
    """One pane's answer as data: what the JSON endpoint returns per pane."""
    return {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason, "weights": weights,
            "logprobs": {"base": c.logprobs_base, "arms": c.logprobs_arms, "fused": c.logprobs_fused},
            "rewards": c.rewards(betas)}


def sweep_figure(rows: list[dict], x_title: str, y_title: str):
    """The sweep's points, each labelled with its weights."""
    from matplotlib.figure import Figure  # no pyplot: thread-safe

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    xs, ys = [r["x"] for r in rows], [r["y"] for r in rows]
    ax.scatter(xs, ys, c=range(len(rows)), cmap="viridis", s=40, zorder=3)
    for r in rows:
        ax.annotate(r["weights"], (r["x"], r["y"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(x_title)
    ax.set_ylabel(y_title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---- the app ----------------------------------------------------------------------------------
def _number(value, name: str, integer: bool = False):
    """A number from a form or an API call; a clear RequestError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise RequestError(f"{name}: expected a finite number, got {value}")
    if integer:
        if value != int(value):
            raise RequestError(f"{name}: expected a whole number, got {value}")
        return int(value)
    return float(value)


def request_options(eng: Engine, temperature, top_p, max_new, seed, normalised) -> SamplingOptions:
    """A visitor's sampling settings, checked against the demo's limits (RequestError if not)."""
    temperature, top_p = _number(temperature, "temperature"), _number(top_p, "top_p")
    max_new, seed = _number(max_new, "max_new_tokens", integer=True), _number(seed, "seed", integer=True)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(f"temperature: expected a number in [0, {MAX_TEMPERATURE}], got {temperature}")
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise RequestError(f"max_new_tokens: expected a whole number in [1, {MAX_NEW_TOKENS}], got {max_new}")
    if not isinstance(normalised, bool):
        raise RequestError(f"normalised: expected true or false, got {normalised!r}")
    base = eng.profile.defaults if eng else SamplingOptions()
    return replace(base, temperature=temperature, top_p=top_p, max_new_tokens=max_new, seed=seed,
                   normalised=normalised)


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise RequestError(f"prompt: expected text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt: {len(prompt)} characters; this demo accepts at most {MAX_PROMPT_CHARS}")
    return prompt


def check_busy(eng: Engine):
    waiting = eng.scheduler.waiting
    if waiting >= MAX_WAITING:
        raise RequestError(f"the demo is busy ({waiting} requests are waiting); please try again in a minute")


def read_profiles(engine: Engine | None, config_path) -> tuple[dict, str, str]:
    """Profiles offered to visitors (models.yaml's `demo:` list), the default one, and a config
    error message (or ""). Other profiles need the operator: visitors cannot load them."""
    profiles, default, error = {}, None, ""
    if engine is None or config_path is not None:
        try:
            config = load_config(config_path)
            profiles = {n: config.profiles[n] for n in config.demo_profiles}
            default = config.default_profile if config.default_profile in profiles else next(iter(profiles))
        except ConfigError as e:
            error = f"**models.yaml cannot be read.**\n\n`{e}`"
    if engine is not None:
        profiles[engine.profile.name] = engine.profile
        default = engine.profile.name
    return profiles, default, error


def tradeoff_assets() -> tuple[str | None, str]:
    """The precomputed trade-off (scripts/evaluate_tradeoff.py): its plot and a table."""
    png, js = ASSETS / "tradeoff.png", ASSETS / "tradeoff.json"
    if not js.exists():
        return (str(png) if png.exists() else None), (
            "*The precomputed helpfulness/harmlessness results (`space_assets/tradeoff.json` and "
            "`tradeoff.png`) are not available yet.* Use the sweep below on your own prompt.")
    try:
        data = json.loads(js.read_text())
        meta = data["meta"]
        text = (f"Judged on {meta['prompts']} held-out prompts (everyday and harmful) x "
                f"{len(meta['seeds'])} seeds, {meta['options']['max_new_tokens']} tokens per answer; "
                "mean ± spread across seeds. *vs base*: everyday helpfulness minus the base's on the "
                "same prompts and seeds, with a 95% bootstrap interval.\n\n" + markdown_table(data["summary"]))
    except (OSError, KeyError, TypeError, ValueError) as e:
        text = f"`{js.name}` could not be read: {e}"
    return (str(png) if png.exists() else None), text


def build_demo(engine: Engine | None = None, config_path=None) -> gr.Blocks:
    profiles, default, config_error = read_profiles(engine, config_path)
    engines = Engines(profiles, engine)
    first_engine, first_note = engines.get(default) if default else (None, "")
    n_sliders = max([1, *(len(p.arms) for p in profiles.values())])
    active = weakref.WeakSet()  # streams in flight, all sessions (for tests and monitoring)

    def slider_props(eng, i):
        arms = list(eng.profile.arms) if eng else []
        if i >= len(arms):
            return {"visible": False}
        a = arms[i]
        info = f"ARM '{a.name}', beta {eng.models.betas.get(a.name, 1.0):g}" + (
            f": {a.description}" if a.description else "")
        return {"minimum": a.weight_min, "maximum": a.weight_max, "value": a.weight_default,
                "label": a.label, "info": info, "visible": True}

    def slider_updates(eng):
        return [gr.Slider(**slider_props(eng, i)) for i in range(n_sliders)]

    def options_from(temperature, top_p, max_new, seed, normalised, eng):
        return request_options(eng, temperature, top_p, max_new, seed, normalised)

    def weights_of(eng, values):
        return {a.name: _number(v, f"weight of '{a.name}'") for a, v in zip(eng.profile.arms, values)}

    # ---- event handlers -------------------------------------------------------------------
    def run(session: Session, steered_only: bool, profile, prompt, compare, temperature, top_p,
            max_new, seed, normalised, *sliders):
        """Streams the panes; yields (base, a, b html, base, a, b stats, status)."""
        session.stop()
        eng, note = engines.get(profile)
        if eng is None:
            gr.Warning(note.replace("*", "").replace("`", ""))
            yield (gr.skip(),) * 6 + (note,)
            return
        try:
            options = options_from(temperature, top_p, max_new, seed, normalised, eng)
            wa, wb = weights_of(eng, sliders[:n_sliders]), weights_of(eng, sliders[n_sliders:])
            check_prompt(prompt)
            check_busy(eng)
            key = (profile, prompt, options)
            base_view = session.views.get("base")
            keep_base = steered_only and session.key == key and base_view is not None and base_view.done
            keys = ([] if keep_base else ["base"]) + ["a"] + (["b"] if compare else [])
            panes = {"base": Pane({}, "base"), "a": Pane(wa, "A"), "b": Pane(wb, "B")}
            stream = eng.stream(prompt, [panes[k] for k in keys], options)
        except RequestError as e:
            gr.Warning(str(e))
            yield (gr.skip(),) * 6 + (f"**Cannot generate:** {e}",)
            return
        t0 = time.perf_counter()
        session.stream, session.panes, session.key = stream, {k: panes[k] for k in keys}, key
        views = {k: PaneView(t0) for k in keys}
        if keep_base:
            views["base"] = base_view
        session.views = views
        active.add(stream)
        betas = eng.models.betas

        def outputs(status):
            html_out = [views[k].html() if k in views else "" for k in PANE_KEYS]
            stats_out = [views[k].stats(betas) if k in views else "" for k in PANE_KEYS]
            return (*html_out, *stats_out, status)

        try:
            if not stream.started.wait(0.25):
                yield outputs("Queued: the server is busy, your answer starts when a slot frees…")
            yield outputs("Generating…")
            shown = 0.0
            for i, step in enumerate(stream):
                now = time.perf_counter()
                for ev in step:
                    views[keys[ev.pane]].add(ev, now)
                if i == 0 or now - shown >= 1 / UPDATES_PER_SECOND:
                    shown = now
                    yield outputs("Generating…")
            yield outputs("Stopped." if stream.cancelled else "Done.")
        finally:  # also runs when Gradio closes this generator (client cancel or disconnect)
            stream.cancel()
            stream.close()
            active.discard(stream)
            if session.stream is stream:
                session.stream = None

    def generate(session, *args):
        yield from run(session, False, *args)

    def steer(session, *args):
        yield from run(session, True, *args)

    def stop(session: Session):
        session.stop()

    def cancel_for_release(session: Session, live: bool):
        if not (live and session.running):
            session.stop()

    def on_release(session: Session, live, *args):
        if live and session.running:  # live mode: the moves were already applied mid-stream
            yield (gr.skip(),) * 7
            return
        yield from run(session, True, *args)

    def live_update(session: Session, live, profile, normalised, *sliders):
        if not (live and session.running):
            return
        eng, _ = engines.get(profile)
        try:
            for key, values in (("a", sliders[:n_sliders]), ("b", sliders[n_sliders:])):
                if key in session.panes:
                    session.panes[key].set_weights(eng.check_weights(weights_of(eng, values), normalised))
        except RequestError as e:
            gr.Warning(str(e))

    def change_profile(session: Session, profile):
        session.stop()
        if not engines.loaded(profile):
            gr.Info(f"Loading profile {profile}…")
        eng, note = engines.get(profile)
        d = eng.profile.defaults if eng else None
        sampling = [gr.update()] * 5 if d is None else [d.temperature, d.top_p, d.max_new_tokens, d.seed, d.normalised]
        return (note, *slider_updates(eng), *slider_updates(eng), *sampling, "", "", "", "", "", "", "")

    def toggle_compare(compare):
        return (gr.Column(visible=compare), gr.Column(visible=compare),
                "#### GenARM A" if compare else "#### GenARM (your weights)",
                "**Weights A**" if compare else "**Weights**")

    def generate_json(profile, prompt, compare, temperature, top_p, max_new, seed, normalised, *sliders) -> dict:
        """For programs: the panes' results as data (text, token ids, per-token log-probs under
        the base, each ARM and the fused distribution, rewards, finish reason), not HTML."""
        eng, note = engines.get(profile)
        if eng is None:
            raise gr.Error(note.replace("*", "").replace("`", ""))
        try:
            options = options_from(temperature, top_p, max_new, seed, normalised, eng)
            wa, wb = weights_of(eng, sliders[:n_sliders]), weights_of(eng, sliders[n_sliders:])
            check_prompt(prompt)
            check_busy(eng)
            keys = ["base", "a"] + (["b"] if compare else [])
            weights = {"base": {}, "a": wa, "b": wb}
            results = eng.generate(prompt, [weights[k] for k in keys], options)
        except RequestError as e:
            raise gr.Error(str(e)) from None
        return {"profile": profile, "prompt": prompt, "options": completion_options(options),
                "panes": {k: completion_record(c, weights[k], eng.models.betas) for k, c in zip(keys, results)}}

    def sweep(profile, prompt, temperature, top_p, max_new, seed, normalised, points):
        eng, note = engines.get(profile)
        if eng is None or not eng.arm_names:
            yield gr.skip(), note or "This profile has no ARMs to sweep."
            return
        try:
            options = replace(options_from(temperature, top_p, max_new, seed, normalised, eng),
                              max_new_tokens=min(int(max_new), 64))
            eng.encode(prompt, options.max_new_tokens)
        except (RequestError, ValueError) as e:
            gr.Warning(str(e))
            yield gr.skip(), f"**Cannot sweep:** {e}"
            return
        arms = eng.profile.arms[:2]
        axes = [[round(lo + (a.weight_max - lo) * i / (int(points) - 1), 3) for i in range(int(points))]
                for a in arms for lo in [max(a.weight_min, 0.0)]]
        grid = [dict(zip([a.name for a in arms], combo)) for combo in itertools.product(*axes)]
        names = [a.name for a in arms]
        x_title = f"{names[0]} reward" if len(names) > 1 else f"{names[0]} weight"
        y_title = f"{names[1]} reward" if len(names) > 1 else f"{names[0]} reward"
        rows = []
        for i in range(0, len(grid), SWEEP_CHUNK):
            chunk = grid[i:i + SWEEP_CHUNK]
            for w, c in zip(chunk, eng.generate(prompt, chunk, options)):
                r = c.rewards(eng.models.betas)
                label = ", ".join(f"{k}={v:g}" for k, v in w.items())
                x = r[names[0]] if len(names) > 1 else w[names[0]]
                y = r[names[1]] if len(names) > 1 else r[names[0]]
                rows.append({"x": x, "y": y, "weights": label, "answer": c.text[:80]})
            yield (sweep_figure(rows, x_title, y_title),
                   f"Sweeping: {len(rows)}/{len(grid)} weight settings ({options.max_new_tokens} tokens each)")
        yield gr.skip(), f"Done: {len(grid)} weight settings. Up and to the right is better on both objectives."

    # ---- layout ---------------------------------------------------------------------------
    d = first_engine.profile.defaults if first_engine else None
    with gr.Blocks(title="GenARM steering demo") as demo:
        gr.Markdown("# GenARM: steer a language model with reward models, token by token\n"
                    "Type a request, move the reward weights and compare the guided answer with the "
                    "unguided base model. See *How it works* below.")
        banner = gr.Markdown(config_error or first_note)
        session = gr.State(Session(), delete_callback=Session.stop)  # freed when the visitor leaves
        with gr.Tab("Steer"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Ask something…",
                                        value=EXAMPLES[0])
                    gr.Examples(EXAMPLES, inputs=prompt, label="Examples: everyday requests and harmful requests")
                    with gr.Row():
                        gen_btn = gr.Button("Generate", variant="primary")
                        stop_btn = gr.Button("Stop", variant="stop")
                        regen_btn = gr.Button("Regenerate")
                with gr.Column(scale=2):
                    profile = gr.Dropdown(list(profiles), value=default, label="Profile (models)",
                                          visible=len(profiles) > 1)
                    weights_a_title = gr.Markdown("**Weights**")
                    sliders_a = [gr.Slider(step=0.1, elem_classes=["genarm-w-a"], **slider_props(first_engine, i))
                                 for i in range(n_sliders)]
                    with gr.Column(visible=False) as col_weights_b:
                        gr.Markdown("**Weights B**")
                        sliders_b = [gr.Slider(step=0.1, elem_classes=["genarm-w-b"], **slider_props(first_engine, i))
                                     for i in range(n_sliders)]
                    with gr.Row():
                        compare = gr.Checkbox(False, label="Compare two weight settings (A and B)")
                        live = gr.Checkbox(False, label="Live: apply slider moves to the running answer")
                    with gr.Accordion("Sampling", open=False):
                        temperature = gr.Slider(0, 2, value=d.temperature if d else 0.7, step=0.05,
                                                label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.05, 1, value=d.top_p if d else 0.9, step=0.05, label="Top-p")
                        max_new = gr.Slider(1, 512, value=d.max_new_tokens if d else 128, step=1,
                                            label="Max new tokens")
                        seed = gr.Number(d.seed if d else 0, precision=0, label="Seed")
                        normalised = gr.Checkbox(d.normalised if d else False,
                                                 label="Normalised: divide the score by 1 + sum of weights",
                                                 info="No sharpening: long guided answers loop less (measured "
                                                      "at 128 tokens), but harmful requests are declined "
                                                      "less often.")
            status = gr.Markdown("", elem_id="status")
            gr.HTML(LEGEND)
            with gr.Row(equal_height=False):
                with gr.Column():
                    gr.Markdown("#### Base (no guidance)")
                    base_html = gr.HTML(elem_id="pane-base")
                    base_stats = gr.Markdown(elem_id="stats-base")
                with gr.Column():
                    a_title = gr.Markdown("#### GenARM (your weights)")
                    a_html = gr.HTML(elem_id="pane-a")
                    a_stats = gr.Markdown(elem_id="stats-a")
                with gr.Column(visible=False) as col_b:
                    gr.Markdown("#### GenARM B")
                    b_html = gr.HTML(elem_id="pane-b")
                    b_stats = gr.Markdown(elem_id="stats-b")
            gr.Markdown(HOW_IT_WORKS)
        with gr.Tab("Trade-off"):
            png, text = tradeoff_assets()
            gr.Markdown("### Helpfulness vs harmlessness\nEach point is one weight setting; its position "
                        "is the trajectory reward of the answer under each reward model.")
            if png:
                gr.Image(png, label="Precomputed trade-off", interactive=False)
            gr.Markdown(text)
            gr.Markdown("#### Sweep the weights on your prompt\nDecodes the prompt of the *Steer* tab "
                        "under a grid of weights of the first two ARMs (others off), a few settings per "
                        "batch, at most 64 tokens each, with the sampling settings of the *Steer* tab.")
            with gr.Row():
                points = gr.Slider(2, 5, value=3, step=1, label="Grid points per ARM")
                sweep_btn = gr.Button("Sweep weights", variant="primary")
            sweep_status = gr.Markdown("", elem_id="status")
            plot = gr.Plot(label="Rewards per weight setting")
        json_out = gr.JSON(visible=False)

        # ---- wiring -----------------------------------------------------------------------
        run_inputs = [session, profile, prompt, compare, temperature, top_p, max_new, seed, normalised,
                      *sliders_a, *sliders_b]
        run_outputs = [base_html, a_html, b_html, base_stats, a_stats, b_stats, status]
        gen_btn.click(generate, run_inputs, run_outputs, api_name="generate", concurrency_limit=STREAMS,
                      concurrency_id="decode")
        prompt.submit(generate, run_inputs, run_outputs, api_visibility="private", concurrency_id="decode")
        stop_btn.click(stop, session, None, api_name="stop", concurrency_limit=None, queue=False)
        gr.Button(visible=False).click(generate_json, run_inputs[1:], json_out, api_name="generate_json",
                                       concurrency_id="decode")
        regen_btn.click(lambda s: int(s or 0) + 1, seed, seed, api_visibility="private",
                        concurrency_limit=None).then(generate, run_inputs, run_outputs, api_visibility="private",
                                                     concurrency_id="decode")
        gr.Button(visible=False).click(steer, run_inputs, run_outputs, api_name="steer",  # slider release, for API clients
                                       concurrency_id="decode")
        live_inputs = [session, live, profile, normalised, *sliders_a, *sliders_b]
        gr.Button(visible=False).click(live_update, live_inputs, None, api_name="live_weights",
                                       api_visibility="undocumented", concurrency_limit=None, queue=False)
        for slider in [*sliders_a, *sliders_b]:
            slider.release(cancel_for_release, [session, live], None, api_visibility="private",
                           concurrency_limit=None, queue=False).then(
                on_release, [session, live, *run_inputs[1:]], run_outputs, api_visibility="private", concurrency_id="decode")
            slider.input(live_update, live_inputs, None,
                         api_visibility="private", concurrency_limit=None, queue=False, show_progress="hidden")
        compare.change(toggle_compare, compare, [col_b, col_weights_b, a_title, weights_a_title],
                       api_visibility="private", queue=False)
        profile.change(change_profile, [session, profile],
                       [banner, *sliders_a, *sliders_b, temperature, top_p, max_new, seed, normalised,
                        *run_outputs], api_visibility="private")
        sweep_btn.click(sweep, [profile, prompt, temperature, top_p, max_new, seed, normalised, points],
                        [plot, sweep_status], api_name="sweep", concurrency_id="decode")
    demo.queue(default_concurrency_limit=4, max_size=4 * STREAMS)
    demo.genarm_active_streams = active
    demo.genarm_engines = engines
    return demo


if __name__ == "__main__":
    build_demo().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
