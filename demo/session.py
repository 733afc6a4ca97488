"""Per-browser-session state: the stream in flight, its panes and what each pane shows."""
from __future__ import annotations

import uuid

from genarm_core import Completion, Pane

from .render import reward_bar, token_span


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

    def rewards_per_token(self, betas: dict) -> dict[str, float]:
        """Each ARM's reward per token of this answer: beta * mean log p_ARM (comparable across
        answers of different lengths)."""
        n = max(len(self.completion.token_ids), 1)
        return {k: v / n for k, v in self.completion.rewards(betas).items()}

    def stats(self, betas: dict, base: "PaneView | None" = None) -> str:
        n = len(self.completion.token_ids)
        parts = [f"{n} tokens"]
        if self.first is not None:
            rate = (n - 1) / (self.last - self.first) if n > 1 and self.last > self.first else None
            parts.append(f"{rate:.1f} tok/s" if rate else "– tok/s")
            parts.append(f"first token {self.first - self.t0:.2f} s")
        if self.completion.finish_reason:
            parts.append({"eos": "finished", "length": "hit max tokens", "stop": "stop string",
                          "cancelled": "stopped"}.get(self.completion.finish_reason, ""))
        line = " · ".join(parts)
        rewards = self.rewards_per_token(betas) if n else {}
        against = base.rewards_per_token(betas) if base is not None and base is not self and base.completion.token_ids else {}
        return line + "".join("<br>" + reward_bar(name, value, against.get(name)) for name, value in rewards.items())


class Session:
    """Per-browser-session state (gr.State): the stream in flight, what each pane shows, and each
    pane's conversation so far (for follow-up turns)."""

    def __init__(self):
        self.id = uuid.uuid4().hex  # names this session's votes; says nothing about the visitor
        self.streams: list = []
        self.panes: dict[str, Pane] = {}
        self.views: dict[str, PaneView] = {}
        self.key = None  # (profile, prompt, options) of the views
        self.run: dict = {}  # the last run: profile, options, per pane its messages and weights

    @property
    def stream(self):
        return self.streams[0] if self.streams else None

    @stream.setter
    def stream(self, value):
        self.streams = [value] if value is not None else []

    def stop(self):
        for stream in list(self.streams):
            stream.cancel()

    @property
    def running(self) -> bool:
        return any(not s.cancelled for s in self.streams)

    def conversation(self, key: str) -> list[dict]:
        """The pane's messages so far: the last run's prompt(s) and its answer."""
        if key not in self.run.get("messages", {}) or key not in self.views:
            return []
        return [*self.run["messages"][key], {"role": "assistant", "content": self.views[key].completion.text}]
