"""The demo's event handlers: module-level functions that take the page's Context first (bound
with functools.partial when the events are wired) and return updates keyed by component."""
from __future__ import annotations

import inspect
import itertools
import json
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr

from genarm_core import Engine, Pane, RequestError
from genarm_core import request as schema
from genarm_core.votes import Vote, VoteError, VoteStore

from .engines import Engines
from .render import completion_record, run_record, runtime_markdown, sweep_frame
from .requests import LIMITS, RunRequest, check_busy, sampling_values, slider_weights, to_page
from .session import PaneView, Session

PANE_KEYS = ("base", "a", "b")
SWEEP_CHUNK = 3  # weight settings decoded together per batch in the trade-off sweep
UPDATES_PER_SECOND = 12  # page updates per stream: each one costs the server Python time
VOTE_CHOICES = {"Left is better": "A", "Right is better": "B", "Tie": "tie", "Both bad": "both_bad"}


@dataclass
class Context:
    """What every handler needs: the page's components, the engines, the streams in flight, the
    votes database."""
    ui: "Layout"  # noqa: F821 - demo.layout.Layout
    engines: Engines
    n_sliders: int
    active: weakref.WeakSet
    votes: VoteStore


def _message(note: str) -> str:
    return note.replace("*", "").replace("`", "")


def pane_outputs(ctx: Context, views: dict[str, PaneView], betas: dict, status: str) -> dict:
    ui = ctx.ui
    out = {ui.status: status}
    for key in PANE_KEYS:
        out[ui.pane_html[key]] = views[key].html() if key in views else ""
        out[ui.pane_stats[key]] = views[key].stats(betas, views.get("base")) if key in views else ""
    return out


def final_outputs(ctx: Context, session: Session, views: dict[str, PaneView], betas: dict, status: str) -> dict:
    """The last update of a run: the panes, their plain text (copy buttons) and the run as JSON."""
    ui = ctx.ui
    out = pane_outputs(ctx, views, betas, status)
    for key in PANE_KEYS:
        out[ui.pane_text[key]] = views[key].completion.text if key in views else ""
    path = Path(tempfile.mkdtemp(prefix="genarm-run-")) / "genarm_run.json"
    path.write_text(json.dumps(run_record(session.run, views, betas), indent=1, ensure_ascii=False))
    out[ui.download] = gr.DownloadButton(value=str(path), visible=True)
    return out


# ---- streaming the panes ----------------------------------------------------------------------
def engine_for(ctx: Context, profile) -> Engine:
    """The engine of an offered profile, or a RequestError that says why not."""
    eng, note = ctx.engines.get(profile)
    if eng is None:
        raise RequestError(_message(note))
    return eng


def _check(ctx: Context, req: RunRequest):
    """The request's engine, options and the weights of the panes base, a and b, all checked by
    the request schema (RequestError with the reason)."""
    eng = engine_for(ctx, req.profile)
    r = schema.parse(req.data(eng), eng, LIMITS)
    check_busy(eng)
    return eng, r.options, dict(zip(PANE_KEYS, r.panes))


def _start(ctx: Context, session: Session, steered_only: bool, req: RunRequest):
    """Starts a run's stream: (engine, [(stream, its pane keys)], views)."""
    eng, options, weights = _check(ctx, req)
    key = (req.profile, req.prompt, options)
    base_view = session.views.get("base")
    keep_base = steered_only and session.key == key and base_view is not None and base_view.done
    keys = ([] if keep_base else ["base"]) + ["a"] + (["b"] if req.compare else [])
    panes = {k: Pane(weights[k], k) for k in PANE_KEYS}
    stream = eng.stream(req.prompt, [panes[k] for k in keys], options)
    session.streams, session.panes, session.key = [stream], {k: panes[k] for k in keys}, key
    views = {k: PaneView(time.perf_counter()) for k in keys}
    if keep_base:
        views["base"] = base_view
    session.run = {"profile": req.profile, "options": options.as_dict(), "weights": weights,
                   "messages": {k: [{"role": "user", "content": req.prompt}] for k in PANE_KEYS}}
    session.views = views
    return eng, [(stream, keys)], views


def _drive(ctx: Context, session: Session, eng: Engine, streams: list, views: dict) -> Iterator[dict]:
    """Yields the page's updates while the streams run; each stream's events go to its panes."""
    betas = eng.models.betas
    for stream, _ in streams:
        ctx.active.add(stream)
    try:
        if not all(s.started.wait(0.25) for s, _ in streams):
            yield pane_outputs(ctx, views, betas, "Queued: the server is busy, your answer starts when a slot frees…")
        yield pane_outputs(ctx, views, betas, "Generating…")
        live, shown, now = list(streams), 0.0, 0.0
        while live:
            for item in list(live):
                step = next(item[0], None)
                if step is None:
                    live.remove(item)
                    continue
                now = time.perf_counter()
                for ev in step:
                    views[item[1][ev.pane]].add(ev, now)
            if now - shown >= 1 / UPDATES_PER_SECOND:
                shown = now
                yield pane_outputs(ctx, views, betas, "Generating…")
        stopped = any(s.cancelled for s, _ in streams)
        yield final_outputs(ctx, session, views, betas, "Stopped." if stopped else "Done.")
    finally:  # also runs when Gradio closes this generator (client cancel or disconnect)
        for stream, _ in streams:
            stream.close()
            ctx.active.discard(stream)
        if session.streams and session.streams[0] is streams[0][0]:
            session.streams = []


def run(ctx: Context, session: Session, steered_only: bool, *values) -> Iterator[dict]:
    """Streams the panes of one request; the updates of the panes, their stats and the status."""
    session.stop()
    try:
        eng, streams, views = _start(ctx, session, steered_only, RunRequest.parse(values, ctx.n_sliders))
    except RequestError as e:
        gr.Warning(str(e))
        yield {ctx.ui.status: f"**Cannot generate:** {e}"}
        return
    yield from _drive(ctx, session, eng, streams, views)


def follow_up(ctx: Context, session: Session, text: str, *values) -> Iterator[dict]:
    """A follow-up turn: each pane continues its own conversation (the chat template over the
    whole history, whose length the profile's prompt limit checks)."""
    session.stop()
    req = RunRequest.parse(values, ctx.n_sliders)
    try:
        if not session.views or not session.run:
            raise RequestError("ask a first question before a follow-up")
        if not isinstance(text, str) or not text.strip():
            raise RequestError("follow-up: type a message first")
        eng, options, _ = _check(ctx, replace(req, prompt=text))
        keys = list(session.views)
        histories = {k: session.conversation(k) + [{"role": "user", "content": text}] for k in keys}
        # every history checked (the limits hold over the whole history) before any stream starts
        ids = {k: eng.encode(histories[k], options.max_new_tokens) for k in keys}
        panes = {k: Pane(session.panes[k].weights if k in session.panes else session.run["weights"][k], k)
                 for k in keys}
        streams = [(eng.stream_ids([ids[k]], [panes[k]], options), [k]) for k in keys]
    except RequestError as e:
        gr.Warning(str(e))
        yield {ctx.ui.status: f"**Cannot follow up:** {e}"}
        return
    session.streams, session.panes, session.key = [s for s, _ in streams], panes, None
    session.run = {**session.run, "options": options.as_dict(), "messages": histories}
    views = {k: PaneView(time.perf_counter()) for k in keys}
    session.views = views
    yield {ctx.ui.follow_up: ""}
    yield from _drive(ctx, session, eng, streams, views)


def vote(ctx: Context, session: Session, helpfulness: str | None, harmlessness: str | None) -> dict:
    """Stores the visitor's verdicts on the two panes side by side (left: base, or A when
    comparing; right: GenARM A, or B) for each objective answered."""
    ui = ctx.ui
    left, right = ("a", "b") if "b" in session.views else ("base", "a")
    if left not in session.views or right not in session.views or session.running:
        return {ui.vote_status: "Vote once both answers are complete."}
    verdicts = {"helpfulness": helpfulness, "harmlessness": harmlessness}
    done, run = [], session.run
    try:
        for objective, choice in verdicts.items():
            if choice:
                ctx.votes.add(Vote(session=session.id, profile=run["profile"], objective=objective,
                                   verdict=VOTE_CHOICES[choice], prompt=json.dumps(run["messages"][left]),
                                   answer_a=session.views[left].completion.text,
                                   answer_b=session.views[right].completion.text, weights_a=run["weights"][left],
                                   weights_b=run["weights"][right], seed=run["options"]["seed"], options=run["options"]))
                done.append(objective)
    except VoteError as e:
        return {ui.vote_status: f"**Vote not stored:** {e}"}
    if not done:
        return {ui.vote_status: "Pick a verdict for helpfulness, harmlessness or both."}
    return {ui.vote_status: f"Thank you: your {' and '.join(done)} vote is stored.",
            ui.vote_help: None, ui.vote_harm: None}


def generate(ctx: Context, session: Session, *values) -> Iterator[dict]:
    yield from run(ctx, session, False, *values)


def steer(ctx: Context, session: Session, *values) -> Iterator[dict]:
    """A slider release: restarts the steered panes, keeping a finished base pane."""
    yield from run(ctx, session, True, *values)


def on_release(ctx: Context, session: Session, live: bool, *values) -> Iterator[dict]:
    if live and session.running:  # live mode: the moves were already applied mid-stream
        return
    yield from run(ctx, session, True, *values)


def stop(session: Session) -> None:
    session.stop()


def cancel_for_release(session: Session, live: bool) -> None:
    if not (live and session.running):
        session.stop()


def live_update(ctx: Context, session: Session, live: bool, profile: str, normalised: bool, *sliders) -> None:
    """Live mode: slider moves change the running panes' weights from the next token on."""
    if not (live and session.running):
        return
    eng, _ = ctx.engines.get(profile)
    n = ctx.n_sliders
    try:
        for key, values in (("a", sliders[:n]), ("b", sliders[n:])):
            if key in session.panes:
                session.panes[key].set_weights(schema.weights(slider_weights(eng, values), eng, normalised))
    except RequestError as e:
        gr.Warning(str(e))


# ---- programs ---------------------------------------------------------------------------------
def generate_json(ctx: Context, data: dict) -> dict:
    """For programs: each pane's answer as data (text, token ids, per-token log-probs under the
    base, each ARM and the fused distribution, rewards, finish reason), not HTML. `data` holds the
    request schema's fields (genarm_core/request.py) by name."""
    try:
        eng = engine_for(ctx, data.get("profile") or ctx.engines.default)
        r = schema.parse(data, eng, LIMITS)
        check_busy(eng)
        results = eng.generate(r.prompt, list(r.panes), r.options)
    except RequestError as e:
        raise gr.Error(str(e)) from None
    return {"profile": eng.profile.name, "prompt": r.prompt, "options": r.options.as_dict(),
            "panes": [completion_record(c, w, eng.models.betas) for c, w in zip(results, r.panes)]}


JSON_ENDPOINT_DOC = ("Answers as data: per pane the text, token ids, per-token log-probs under the base, each ARM "
                     "and the fused distribution, the rewards and the finish reason.")


def json_endpoint(ctx: Context):
    """generate_json as the named Gradio API /generate_json: one named, typed parameter per field of
    the request schema (the prompt is required; the others default to the profile's)."""
    def endpoint(*values):
        return generate_json(ctx, dict(zip(schema.NAMES, values)))

    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                **({} if f.name == "prompt" else {"default": None}),
                                annotation=f.annotation if f.name == "prompt" else f.annotation | None)
              for f in schema.FIELDS]
    endpoint.__signature__ = inspect.Signature(params, return_annotation=dict)
    endpoint.__annotations__ = {p.name: p.annotation for p in params} | {"return": dict}
    endpoint.__name__ = "generate_json"
    endpoint.__doc__ = "\n".join([JSON_ENDPOINT_DOC, "", "Args:", *(f"    {f.name}: {f.help}" for f in schema.FIELDS)])
    return endpoint


# ---- the page's other controls ------------------------------------------------------------------
def slider_props(eng: Engine | None, i: int) -> dict:
    arms = list(eng.profile.arms) if eng else []
    if i >= len(arms):
        return {"visible": False}
    a = arms[i]
    info = f"ARM '{a.name}', beta {eng.models.betas.get(a.name, 1.0):g}" + (f": {a.description}" if a.description else "")
    return {"minimum": a.weight_min, "maximum": a.weight_max, "value": a.weight_default, "label": a.label,
            "info": info, "visible": True}


def change_profile(ctx: Context, session: Session, profile: str) -> dict:
    """Loads the picked profile (if needed) and resets the sliders and sampling to its defaults."""
    ui = ctx.ui
    session.stop()
    if not ctx.engines.loaded(profile):
        gr.Info(f"Loading profile {profile}…")
    eng, note = ctx.engines.get(profile)
    out = {ui.banner: note, ui.runtime: runtime_markdown(eng),
           **{c: "" for c in [*ui.pane_html.values(), *ui.pane_stats.values(), ui.status]}}
    for i in range(ctx.n_sliders):
        out[ui.sliders_a[i]] = out[ui.sliders_b[i]] = gr.Slider(**slider_props(eng, i))
    if eng is not None:
        d = eng.profile.defaults
        out.update({ui.sampling[name]: to_page(name, getattr(d, name)) for name in ui.sampling})
    return out


def toggle_compare(ctx: Context, compare: bool) -> dict:
    ui = ctx.ui
    return {ui.col_b: gr.Column(visible=compare), ui.col_weights_b: gr.Column(visible=compare),
            ui.a_title: "#### GenARM A" if compare else "#### GenARM (your weights)",
            ui.weights_a_title: "**Weights A**" if compare else "**Weights**"}


def next_seed(seed) -> int:
    return int(seed or 0) + 1


def sweep(ctx: Context, profile: str, prompt: str, *values) -> Iterator[dict]:
    """Decodes the prompt under a grid of the first two ARMs' weights; streams the points."""
    ui = ctx.ui
    *sampling, points = values
    eng, note = ctx.engines.get(profile)
    if eng is None or not eng.arm_names:
        yield {ui.sweep_status: note or "This profile has no ARMs to sweep."}
        return
    try:
        options = schema.options(sampling_values(sampling), eng.profile.defaults, LIMITS)
        options = replace(options, max_new_tokens=min(options.max_new_tokens, 64))
        eng.encode(schema.check_prompt(prompt, LIMITS), options.max_new_tokens)
    except RequestError as e:
        gr.Warning(str(e))
        yield {ui.sweep_status: f"**Cannot sweep:** {e}"}
        return
    arms, n = eng.profile.arms[:2], int(points)
    axes = [[round(max(a.weight_min, 0.0) + (a.weight_max - max(a.weight_min, 0.0)) * i / (n - 1), 3)
             for i in range(n)] for a in arms]
    grid = [dict(zip([a.name for a in arms], combo)) for combo in itertools.product(*axes)]
    names = [a.name for a in arms]
    titles = (f"{names[0]} reward", f"{names[1]} reward") if len(names) > 1 else (f"{names[0]} weight",
                                                                                   f"{names[0]} reward")
    rows = []
    for i in range(0, len(grid), SWEEP_CHUNK):
        chunk = grid[i:i + SWEEP_CHUNK]
        for w, c in zip(chunk, eng.generate(prompt, chunk, options)):
            r = c.rewards(eng.models.betas)
            x, y = (r[names[0]], r[names[1]]) if len(names) > 1 else (w[names[0]], r[names[0]])
            rows.append({"x": x, "y": y, "setting": ", ".join(f"{k}={v:g}" for k, v in w.items()),
                         "answer": c.text[:300]})
        yield {ui.plot: sweep_frame(rows, *titles),
               ui.sweep_status: f"Sweeping: {len(rows)}/{len(grid)} weight settings ({options.max_new_tokens} tokens each)"}
    yield {ui.sweep_status: f"Done: {len(grid)} weight settings. Up and to the right is better on both objectives."}
