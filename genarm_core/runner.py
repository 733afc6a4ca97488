"""Runs what the scheduler decided: the model forwards of one step, over the caches it owns.

With the native kernels (native.py) every backbone runs the step's decode tokens and prompt
chunks together in ONE ragged forward (Backbone.forward_rows): no padding, each row computed on
its own, so a sequence's numbers are the same whatever else runs and however its prompt was cut.
Elsewhere (GPUs, bf16, no native kernels) prompts are written whole and alone (Backbone.prefill)
and the running sequences step together (Backbone.step).

Cache slots follow the order in which sequences joined (`seqs`); a prompt is written into its
first pane's slot and copied to its other panes' slots when complete. Complete prompts are kept
in the prefix cache, so a restart of the same prompt (a slider release) skips its forward."""
from __future__ import annotations

import torch

from . import fusion
from .backbone import Cache
from .models import LoadedModels
from .scheduler import Group, Plan, Sequence


class PrefixCache:
    """The last few prompts' cache entries and first log-probs per backbone, keyed by token ids.
    Entries are never written to (joining the batch copies them), so they can be shared."""

    def __init__(self, size: int = 8):
        from collections import OrderedDict
        import threading

        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self.entries:
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key]

    def put(self, key, value):
        with self._lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self):
        with self._lock:
            self.entries.clear()


class Ready:
    """A sequence whose next-token log-probs this step produced: base [V] and ARMs [N, V]."""
    __slots__ = ("seq", "base", "arms")

    def __init__(self, seq: Sequence, base: torch.Tensor, arms: torch.Tensor):
        self.seq, self.base, self.arms = seq, base, arms


class ModelRunner:
    def __init__(self, models: LoadedModels, prefix_cache: PrefixCache):
        self.m, self.prefix_cache = models, prefix_cache
        self.ragged = all(bb.native is not None for bb in models.backbones)  # chunks + decode in one forward
        self.seqs: list[Sequence] = []  # slot order
        self.caches: list[Cache] = []
        self.forwards = 0

    def _slot(self, seq: Sequence) -> int:
        return next(i for i, s in enumerate(self.seqs) if s is seq)

    def _ensure_caches(self):
        if not self.caches:
            self.caches = [Cache(bb) for bb in self.m.backbones]

    # ---- joining and leaving
    def admit(self, groups: list[Group]) -> list[Ready]:
        """Slots for newly admitted groups (ragged runners: at once, to be written chunk by chunk);
        groups found in the prefix cache are complete at once: their panes' log-probs."""
        ready = []
        if not self.ragged:
            return ready  # prompts are written whole by run(), after the step's decode
        for g in groups:
            hit = self.prefix_cache.get(tuple(g.ids))
            self._ensure_caches()
            first = len(self.seqs)
            for cache in self.caches:
                cache.add_empty(len(g.seqs))
            self.seqs += g.seqs
            if hit is not None:
                entries, base, arms = hit
                for cache, entry in zip(self.caches, entries):
                    for k in range(len(g.seqs)):
                        cache.write(first + k, entry)
                g.written = len(g.ids)
                ready += [Ready(s, base, arms) for s in g.seqs]
        return ready

    def free(self, seqs: list[Sequence]):
        gone = set(map(id, seqs))
        alive = [i for i, s in enumerate(self.seqs) if id(s) not in gone]
        if len(alive) == len(self.seqs):
            return
        for cache in self.caches:
            cache.keep(alive)
        self.seqs = [self.seqs[i] for i in alive]
        if not self.seqs:
            self.caches = []

    def reset(self):
        self.seqs, self.caches = [], []

    # ---- one step
    @torch.inference_mode()
    def run(self, plan: Plan) -> tuple[list[Ready], list[tuple[Group, int]]]:
        """The step's forwards: log-probs for every decoding sequence and for the panes of every
        prompt completed now; and how far each chunked group's prompt is written."""
        if not plan.decode and not plan.chunks:
            return [], []
        self.forwards += 1
        return self._ragged(plan) if self.ragged else self._whole(plan)

    def _split(self, per_backbone: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m.split_rows([fusion.token_logprobs(lg) for lg in per_backbone])

    def _ragged(self, plan: Plan):
        device = self.m.device
        lengths = list(self.caches[0].lengths)
        tokens, slots, positions, logits_at = [], [], [], []
        for s in plan.decode:
            i = self._slot(s)
            logits_at.append(len(tokens))
            tokens.append(s.next_token), slots.append(i), positions.append(lengths[i])
            lengths[i] += 1
        done = []
        for g, a, b in plan.chunks:
            i = self._slot(g.seqs[0])
            tokens += g.ids[a:b]
            slots += [i] * (b - a)
            positions += list(range(a, b))
            lengths[i] = b
            if b == len(g.ids):
                logits_at.append(len(tokens) - 1)
                done.append((g, i))
        t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        args = (t(tokens), t(slots), t(positions), t(logits_at))
        base, arms = self._split([bb.forward_rows(c, *args) for bb, c in zip(self.m.backbones, self.caches)])
        for cache in self.caches:
            cache.set_lengths(lengths)
        ready = [Ready(s, base[k], arms[k]) for k, s in enumerate(plan.decode)]
        for k, (g, i) in enumerate(done, start=len(plan.decode)):
            entries = [cache.entry(i) for cache in self.caches]
            for cache, entry in zip(self.caches, entries):
                for j in range(1, len(g.seqs)):
                    cache.write(i + j, entry)
            self.prefix_cache.put(tuple(g.ids), (entries, base[k], arms[k]))
            ready += [Ready(s, base[k], arms[k]) for s in g.seqs]
        return ready, [(g, b) for g, _, b in plan.chunks]

    def _whole(self, plan: Plan):
        ready = []
        if plan.decode:  # every slot is a running sequence here: prompts join whole, after this
            tokens = torch.tensor([s.next_token for s in self.seqs], device=self.m.device)
            base, arms = self._split([bb.step(c, tokens) for bb, c in zip(self.m.backbones, self.caches)])
            ready = [Ready(s, base[i], arms[i]) for i, s in enumerate(self.seqs)]
        for g, a, b in plan.chunks:
            hit = self.prefix_cache.get(tuple(g.ids))
            if hit is None:
                outputs = [bb.prefill(g.ids) for bb in self.m.backbones]
                base, arms = self._split([lg for _, lg in outputs])
                hit = ([e for e, _ in outputs], base[0], arms[0])
                self.prefix_cache.put(tuple(g.ids), hit)
            entries, base, arms = hit
            self._ensure_caches()
            for cache, entry in zip(self.caches, entries):
                cache.append([entry] * len(g.seqs))
            self.seqs += g.seqs
            ready += [Ready(s, base, arms) for s in g.seqs]
        return ready, [(g, b) for g, _, b in plan.chunks]
