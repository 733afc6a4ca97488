"""Per-browser-session state: the stream in flight, its panes and what each pane shows."""
from __future__ import annotations

from genarm_core import Completion, Pane

from .render import token_span


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
