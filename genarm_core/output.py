"""From chosen tokens to what callers read: incremental detokenisation, stop strings, finish
reasons, and the TokenEvents delivered to each request's queue (one list per request per step)."""
from __future__ import annotations

from dataclasses import dataclass

from . import fusion
from .detokenize import IncrementalDetokenizer, StopStringFilter
from .sampler import Pick
from .scheduler import Sequence
from .streams import END, FinishReason, Request, TokenEvent


@dataclass
class OutputState:
    """A sequence's text so far and what its repetition rules need of its context."""
    detok: IncrementalDetokenizer
    stop: StopStringFilter
    seen: set | None = None  # context tokens, for the repetition penalty
    ngrams: fusion.NgramIndex | None = None  # for no-repeat n-grams

    @classmethod
    def start(cls, request: Request, prompt: int, tokenizer) -> "OutputState":
        o, ids = request.options, request.prompts[prompt]
        return cls(IncrementalDetokenizer(tokenizer), StopStringFilter(o.stop),
                   seen=set(ids) if o.repetition_penalty != 1.0 else None,
                   ngrams=fusion.NgramIndex(o.no_repeat_ngram_size, ids) if o.no_repeat_ngram_size else None)

    def push(self, token: int):
        if self.seen is not None:
            self.seen.add(token)
        if self.ngrams is not None:
            self.ngrams.push(token)


def emit(seqs: list[Sequence], picks: list[Pick], arm_names: list[str]):
    """Turns each sequence's pick into its event and sets its next token: the step's events (per
    request, for deliver()), the requests, and the sequences that finished."""
    events: dict[int, list[TokenEvent]] = {}
    requests: dict[int, Request] = {}
    finished = []
    for s, p in zip(seqs, picks):
        out, last = s.out, s.step == s.request.options.max_new_tokens - 1
        out.push(p.token)
        if p.eos:
            text, reason = out.stop.push(out.detok.flush()) + out.stop.flush(), FinishReason.EOS
        else:
            text = out.stop.push(out.detok.push(p.token))
            reason = FinishReason.STOP if out.stop.stopped else None
            if reason is None and last:
                text += out.stop.push(out.detok.flush()) + out.stop.flush()
                reason = FinishReason.LENGTH
        events.setdefault(id(s.request), []).append(
            TokenEvent(s.prompt, s.pane, s.step, p.token, text, p.logprob_base, dict(zip(arm_names, p.logprob_arms)),
                       p.logprob_fused, p.weights, reason))
        requests[id(s.request)] = s.request
        s.step += 1
        s.next_token = p.token
        if reason:
            finished.append(s)
    return events, requests, finished


def cancelled_event(s: Sequence) -> TokenEvent:
    return TokenEvent(s.prompt, s.pane, s.step, -1, "", float("nan"), {}, float("nan"),
                      s.request.panes[s.pane].weights, FinishReason.CANCELLED)


def deliver(requests: dict[int, Request], events: dict[int, list[TokenEvent]]):
    """One list of events per request; END after a request's last sequence is done."""
    for rid, evs in events.items():
        r = requests[rid]
        r.out.put(evs)
        if r.done:
            r.out.put(END)
