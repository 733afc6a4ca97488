"""Requests and streams: what a caller holds (Stream, Pane) and gets (TokenEvent, Completion),
and what the engine keeps of each request (Request, with its prompts' state)."""
from __future__ import annotations

import enum
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from .options import SamplingOptions


class FinishReason(str, enum.Enum):
    """Why a pane's answer ended (compares equal to its string: "eos", "stop", ...)."""
    EOS = "eos"  # the model's end-of-turn token
    STOP = "stop"  # a stop string
    LENGTH = "length"  # max_new_tokens
    CANCELLED = "cancelled"  # cancelled, closed or dropped by the caller

    def __str__(self) -> str:
        return self.value


class PromptState(enum.Enum):
    """Where one prompt of a request is: waiting for rows, its prompt being written into the cache
    (chunk by chunk), its panes decoding, or done."""
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    DONE = "done"


class Pane:
    """One weight setting. `set_weights` may be called from any thread while a stream runs;
    the next token uses the new values (the dict is replaced whole, never mutated). Validate
    user input with Engine.check_weights first; ARMs not named have weight 0."""

    def __init__(self, weights: dict[str, float], label: str = ""):
        self.weights = dict(weights)
        self.label = label

    def set_weights(self, weights: dict[str, float]):
        self.weights = dict(weights)


@dataclass
class TokenEvent:
    prompt: int  # index of the prompt in the request
    pane: int  # index of the pane (weight setting)
    step: int
    token_id: int
    text: str  # the text this token adds (may be "" while a character or stop string is pending)
    logprob_base: float  # log p of the chosen token under each model and the fused distribution
    logprob_arms: dict[str, float]
    logprob_fused: float
    weights: dict[str, float]  # the weights this token was drawn with
    finish_reason: FinishReason | None = None  # on a pane's last event

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs_base: list[float] = field(default_factory=list)
    logprobs_arms: dict[str, list[float]] = field(default_factory=dict)
    logprobs_fused: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    def add(self, event: TokenEvent):
        self.text += event.text
        self.finish_reason = event.finish_reason
        if event.token_id < 0:
            return
        self.token_ids.append(event.token_id)
        self.logprobs_base.append(event.logprob_base)
        for name, lp in event.logprob_arms.items():
            self.logprobs_arms.setdefault(name, []).append(lp)
        self.logprobs_fused.append(event.logprob_fused)

    def rewards(self, betas: dict[str, float]) -> dict[str, float]:
        """Each ARM's trajectory reward beta * sum_t log pi_r(y_t | x, y_<t) of this answer."""
        return {n: betas[n] * sum(lps) for n, lps in self.logprobs_arms.items()}


END = object()  # the last item of a request's output queue


class Request:
    """What the engine knows of one stream: its prompts (and each one's state), panes, options and
    output queue. Holds no reference to the Stream, so a dropped Stream can be collected (and
    cancels)."""

    def __init__(self, prompts: list[list[int]], panes: list[Pane], options: SamplingOptions):
        self.prompts, self.panes, self.options = prompts, panes, options
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.started = threading.Event()  # set when the first prompt joins the batch
        self.states = [PromptState.WAITING] * len(prompts)
        self.waiting = deque(range(len(prompts)))  # prompts not yet admitted, in order
        self.running = 0  # sequences (prompt x pane) admitted and not finished
        self.generators: dict[int, torch.Generator] = {}  # per prompt: its panes share the draws

    @property
    def rows_per_prompt(self) -> int:
        return len(self.panes)

    @property
    def done(self) -> bool:
        return self.running == 0 and not self.waiting

    def final_events(self, prompt: int, reason: FinishReason) -> list[TokenEvent]:
        return [TokenEvent(prompt, k, 0, -1, "", float("nan"), {}, float("nan"), p.weights, reason)
                for k, p in enumerate(self.panes)]


class Stream:
    """An iterator of steps; each step is a list of TokenEvents of this stream's sequences that
    advanced in one engine step (one per running pane). `cancel()` (from any thread) ends it
    before the next token; a stream that is closed or garbage-collected is cancelled too."""

    def __init__(self, core, request: Request):
        """core: the engine loop (engine.EngineCore) that takes the request."""
        self._request = request
        self.panes = request.panes
        self._done = False
        self._core = core
        self._finalizer = weakref.finalize(self, _cancel, request, core)
        core.submit(request)

    def __iter__(self):
        return self

    def __next__(self) -> list[TokenEvent]:
        if self._done:
            raise StopIteration
        item = self._request.out.get()
        if item is END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def cancel(self):
        _cancel(self._request, self._core)

    @property
    def cancelled(self) -> bool:
        return self._request.cancelled.is_set()

    @property
    def started(self) -> threading.Event:
        """Set when the first of this stream's prompts has joined the batch (until then, it waits
        in line behind the streams that fill the batch: `max_rows`)."""
        return self._request.started

    @property
    def queued(self) -> bool:
        return not self._request.started.is_set() and not self._done

    def close(self):
        self.cancel()
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cancel(request: Request, core):
    request.cancelled.set()
    core.wake()
