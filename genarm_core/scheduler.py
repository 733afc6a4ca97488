"""What runs in the next engine step, and nothing else: which waiting prompts join the batch
(while their rows fit under max_rows, in order), which prompt chunks are written into the cache
(within a budget of tokens per step, beside every running sequence's next token), and which
sequences decode. It calls no model; the runner (runner.py) runs what it decides."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from .streams import PromptState, Request


@dataclass(eq=False)
class Sequence:
    """One answer: a (request, prompt, pane). `out` is its output state (output.py); `next_token`
    the token it feeds at the next step (None while its prompt is being written)."""
    request: Request
    prompt: int
    pane: int
    out: object = None
    step: int = 0
    next_token: int | None = None


@dataclass(eq=False)
class Group:
    """One prompt of a request and its panes' sequences, which share the prompt's cache: it is
    written once (into the first pane's slot) and copied to the others when complete."""
    request: Request
    prompt: int
    ids: list[int]
    seqs: list[Sequence]
    written: int = 0  # prompt tokens in the cache

    @property
    def complete(self) -> bool:
        return self.written == len(self.ids)


@dataclass
class Plan:
    """One step: the sequences that decode (one token each) and the prompt chunks (group, start,
    end) written in the same forward."""
    decode: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[Group, int, int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(b - a for _, a, b in self.chunks)


class Scheduler:
    """Admission in order under max_rows; a token budget per step (step_tokens) shared by the
    running sequences' decode tokens and the waiting prompts' chunks, so a long prompt never
    holds the running streams for more than one step's budget. chunked=False (runners that
    cannot write a prompt in pieces): each admitted prompt is written whole in its first step."""

    def __init__(self, rows_per_sequence: int, max_rows: int, step_tokens: int, chunked: bool):
        self.rows_per_sequence, self.max_rows = rows_per_sequence, max_rows
        self.step_tokens, self.chunked = step_tokens, chunked
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self.prefilling: list[Group] = []  # admitted, prompt not complete, in admission order
        self.running: list[Sequence] = []  # decoding

    # -- any thread
    def submit(self, request: Request):
        with self._lock:
            self._waiting.append(request)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self.prefilling or self.running)

    @property
    def rows_in_flight(self) -> int:
        return (len(self.running) + sum(len(g.seqs) for g in self.prefilling)) * self.rows_per_sequence

    # -- the worker thread
    def take_cancelled_waiting(self) -> list[Request]:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for r in gone:
                self._waiting.remove(r)
        return gone

    def admit(self, encode_group) -> list[Group]:
        """Waiting prompts that join now, in order, while their rows fit (the first always fits).
        encode_group(request, prompt) makes the Group (its sequences' output state)."""
        groups = []
        while True:
            with self._lock:
                if not self._waiting:
                    break
                r = self._waiting[0]
                busy = self.rows_in_flight + sum(len(g.seqs) for g in groups) * self.rows_per_sequence
                if busy and busy + r.rows_per_prompt * self.rows_per_sequence > self.max_rows:
                    break
                p = r.waiting.popleft()
                if not r.waiting:
                    self._waiting.popleft()
            r.states[p] = PromptState.PREFILLING
            r.running += r.rows_per_prompt
            r.started.set()
            groups.append(encode_group(r, p))
        self.prefilling += groups
        return groups

    def plan(self) -> Plan:
        plan = Plan(decode=[s for s in self.running if s.next_token is not None])  # (not those just joined)
        budget = max(self.step_tokens - len(plan.decode), self.step_tokens // 4)  # prompts always progress
        for g in self.prefilling:
            left = len(g.ids) - g.written
            take = left if not self.chunked else min(left, budget)
            if take <= 0:
                break
            plan.chunks.append((g, g.written, g.written + take))
            budget -= take
        return plan

    def written(self, group: Group, upto: int):
        """The runner wrote the group's prompt up to `upto`; a complete prompt's panes decode."""
        group.written = upto
        if group.complete:
            self.prefilling.remove(group)
            group.request.states[group.prompt] = PromptState.RUNNING
            self.running += group.seqs

    def finish(self, seqs: list[Sequence]):
        """These sequences ended (finished or cancelled)."""
        gone = set(map(id, seqs))
        self.running = [s for s in self.running if id(s) not in gone]
        for s in seqs:
            s.request.running -= 1

    def drop_group(self, group: Group):
        """A prefilling group whose request was cancelled."""
        self.prefilling.remove(group)
        group.request.running -= len(group.seqs)
        group.request.states[group.prompt] = PromptState.DONE

    def reset(self) -> list[Request]:
        """Drops every admitted sequence (after a failure); the requests they belonged to."""
        requests = {id(s.request): s.request for s in self.running}
        requests.update({id(g.request): g.request for g in self.prefilling})
        self.running, self.prefilling = [], []
        return list(requests.values())
