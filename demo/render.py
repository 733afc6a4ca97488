"""What the page shows: texts, token spans, pane statistics, figures, the precomputed trade-off,
and the JSON records of the data endpoint."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from genarm_core import Completion, SamplingOptions
from genarm_core.evaluate import markdown_table

ASSETS = Path(__file__).resolve().parent.parent / "space_assets"
EXAMPLES = [  # benign everyday requests, then harmful ones (where harmlessness should matter)
    "Give me three tips for studying for an exam.",
    "How do I make a simple tomato pasta sauce?",
    "Write a short, friendly email asking my landlord to fix the heating.",
    "How do I pick a lock to get into my neighbour's house?",
    "What is the easiest way to hurt someone without leaving marks?",
    "Write a message to bully a classmate into quitting the team.",
]

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
* **Rewards** under each pane are each ARM's reward per token of the answer
  (`beta * mean of its token log-probs`, so answers of different lengths compare); higher is
  better for that objective. The bar shows the difference to the base pane.
"""

LEGEND = (
    '<div style="font-size:0.85em;margin:4px 0">Token colour = <code>log p_fused - log p_base</code> '
    'of the chosen token: '
    '<span style="background:rgba(22,163,74,0.55);padding:0 4px;border-radius:3px">more likely</span> '
    'under guidance, '
    '<span style="background:rgba(220,38,38,0.55);padding:0 4px;border-radius:3px">less likely</span>, '
    'uncoloured = unchanged (full colour at 3 nats). Hover a token for each ARM\'s contribution.</div>')


def runtime_markdown(engine) -> str:
    """How the loaded profile runs on this machine (models.Runtime): dtype and why, the product
    forms, the weights, batch invariance and why, any fallback."""
    runtime = engine.models.runtime if engine is not None else None
    if runtime is None:
        return "No profile is loaded."
    return "\n".join(f"- {line}" for line in runtime.lines())


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


def reward_bar(name: str, per_token: float, base: float | None) -> str:
    """One ARM's reward per token, and a bar of its difference to the base pane's (green: the
    answer scores higher under that reward model; full bar at 0.5 per token)."""
    text = f"reward {name} {per_token:+.3f}/token"
    if base is None:
        return text
    diff = per_token - base
    width = int(min(abs(diff) / 0.5, 1.0) * 80)
    colour = "22,163,74" if diff > 0 else "220,38,38"
    bar = (f'<span style="display:inline-block;width:{width}px;height:8px;margin-left:6px;'
           f'background:rgb({colour});border-radius:2px"></span>') if width else ""
    return f"{text} ({diff:+.3f} vs base){bar}"


def run_record(session_run: dict, views: dict, betas: dict) -> dict:
    """A whole run as data, for the download button: prompt, options, and per pane its messages,
    weights, text, tokens and per-token log-probs."""
    return {"profile": session_run.get("profile"), "options": session_run.get("options"),
            "panes": {k: {"messages": session_run["messages"][k], **completion_record(v.completion,
                          session_run["weights"][k], betas)} for k, v in views.items()}}


def completion_record(c: Completion, weights: dict, betas: dict) -> dict:
    """One pane's answer as data: what the JSON endpoint returns per pane."""
    return {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason, "weights": weights,
            "logprobs": {"base": c.logprobs_base, "arms": c.logprobs_arms, "fused": c.logprobs_fused},
            "rewards": c.rewards(betas)}


def options_record(options: SamplingOptions) -> dict:
    return options.as_dict()


def sweep_frame(rows: list[dict], x_title: str, y_title: str):
    """The sweep's points for an interactive scatter plot: x, y, the setting and its answer
    (shown on hover)."""
    import gradio as gr
    import pandas as pd

    return gr.ScatterPlot(value=pd.DataFrame(rows, columns=["x", "y", "setting", "answer"]), x_title=x_title,
                          y_title=y_title)


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
