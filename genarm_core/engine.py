"""The fused decoding engine: one scheduler steps every running stream together.

Every token: one forward of each backbone over every live sequence of every stream (the base
backbone computes the base and all its LoRA ARMs as rows, see backbone.py; a standalone ARM is
its own backbone), then the GenARM fusion and the sampler of fusion.py, row by row with each
stream's own options, weights and random generator. Weights are read from the panes at every
step, so they can change while a stream runs. One host sync per token: the chosen ids and
their log-probs.

Streams join between two tokens (after their prompt's prefill) and leave as soon as they finish,
are cancelled or are dropped; at most `max_rows` model rows run at once, further prompts wait in
order. A stream's tokens do not depend on what else runs: its prompts are prefilled alone, its
random draws come from its own generator; only the float rounding of batched products differs
with the batch's size (about 1e-6 relative), which could change a token only at an exact tie.
"""
from __future__ import annotations

import math
import queue
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from . import fusion
from .backbone import Cache
from .config import load_config
from .detokenize import IncrementalDetokenizer, StopStringFilter
from .errors import RequestError
from .options import SamplingOptions
from .models import LoadedModels, load_models
from .prompts import prompt_ids, prompt_is_empty, response_ids
from .worker import WORKER



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
    finish_reason: str | None = None  # "eos", "stop", "length" or "cancelled" on a pane's last event

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
    finish_reason: str | None = None

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


class PrefixCache:
    """The last few prompts' cache entries and first log-probs per backbone, keyed by token ids.
    Entries are never written to (joining the batch copies them), so they can be shared."""

    def __init__(self, size: int = 8):
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


# ---- requests and streams ---------------------------------------------------------------------
_END = object()


class _Request:
    """What the scheduler knows of one stream: its prompts, panes, options and output queue.
    Holds no reference to the Stream, so a dropped Stream can be collected (and cancels)."""

    def __init__(self, prompts: list[list[int]], panes: list[Pane], options: SamplingOptions):
        self.prompts, self.panes, self.options = prompts, panes, options
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.started = threading.Event()  # set when the first prompt joins the batch
        self.waiting = deque(range(len(prompts)))  # prompts not yet admitted
        self.running = 0  # sequences in the batch
        self.generators: dict[int, torch.Generator] = {}

    @property
    def rows_per_prompt(self) -> int:
        return len(self.panes)

    def final_events(self, prompt: int, reason: str) -> list[TokenEvent]:
        return [TokenEvent(prompt, k, 0, -1, "", float("nan"), {}, float("nan"), p.weights, reason)
                for k, p in enumerate(self.panes)]


def _cancel(request: _Request, scheduler: "Scheduler"):
    request.cancelled.set()
    scheduler.wake()


class Stream:
    """An iterator of steps; each step is a list of TokenEvents of this stream's sequences that
    advanced in one scheduler step (one per running pane). `cancel()` (from any thread) ends it
    before the next token; a stream that is closed or garbage-collected is cancelled too."""

    def __init__(self, engine: "Engine", request: _Request):
        self._request = request
        self.panes = request.panes
        self._done = False
        self._scheduler = engine.scheduler
        self._finalizer = weakref.finalize(self, _cancel, request, engine.scheduler)
        engine.scheduler.submit(request)

    def __iter__(self):
        return self

    def __next__(self) -> list[TokenEvent]:
        if self._done:
            raise StopIteration
        item = self._request.out.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def cancel(self):
        self._request.cancelled.set()
        self._scheduler.wake()

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


# ---- the scheduler ----------------------------------------------------------------------------
@dataclass
class _Seq:
    request: _Request
    prompt: int
    pane: int
    detok: IncrementalDetokenizer
    stop: StopStringFilter
    step: int = 0
    seen: set | None = None  # context tokens, for the repetition penalty
    ngrams: fusion.NgramIndex | None = None  # for no-repeat n-grams

    @classmethod
    def start(cls, request: "_Request", prompt: int, pane: int, tokenizer) -> "_Seq":
        o, ids = request.options, request.prompts[prompt]
        return cls(request, prompt, pane, IncrementalDetokenizer(tokenizer), StopStringFilter(o.stop),
                   seen=set(ids) if o.repetition_penalty != 1.0 else None,
                   ngrams=fusion.NgramIndex(o.no_repeat_ngram_size, ids) if o.no_repeat_ngram_size else None)

    def push(self, token: int):
        if self.seen is not None:
            self.seen.add(token)
        if self.ngrams is not None:
            self.ngrams.push(token)


class Scheduler:
    """Steps all live sequences of one engine together, on the worker thread (worker.py).

    Batch state, in batch order: `seqs`, one Cache per backbone, and the next-token log-probs of
    every sequence (`base_lp` [S, V], `arm_lp` [S, N, V]).
    """

    def __init__(self, models: LoadedModels, prefix_cache: PrefixCache):
        self.m, self.prefix_cache = models, prefix_cache  # no reference back to the Engine
        self.max_rows = models.max_rows
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self.seqs: list[_Seq] = []
        self.caches: list[Cache] = []
        self.base_lp = self.arm_lp = None
        self.steps = 0  # batched forward steps run (for tests and monitoring)

    # -- called from any thread
    def submit(self, request: _Request):
        with self._lock:
            self._waiting.append(request)
        WORKER.wake(self)

    def wake(self):
        WORKER.wake(self)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.seqs or self._waiting)

    @property
    def rows_in_flight(self) -> int:
        return len(self.seqs) * self.m.rows_per_sequence

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- called on the worker thread
    def run_once(self) -> bool:
        """One scheduler step; False when there was nothing to do."""
        if not self.has_work():
            self._reset()
            return False
        try:
            with torch.inference_mode():
                self._iteration()
        except Exception as e:  # noqa: BLE001 - delivered to every stream in the batch
            self._fail(e)
        return True

    def _iteration(self):
        self._drop_cancelled_waiting()
        self._admit()
        self._drop_cancelled()
        if not self.seqs:
            return
        tokens = self._choose_and_emit()
        if self.seqs:
            self._forward(tokens)

    def _drop_cancelled_waiting(self):
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            r.started.set()
            events = [ev for p in r.waiting for ev in r.final_events(p, "cancelled")]
            r.waiting.clear()
            if events:
                r.out.put(events)
            if r.running == 0:
                r.out.put(_END)

    def _admit(self):
        """Prefills waiting prompts, in order, while their rows fit (the first always fits)."""
        entries, base, arms = [[] for _ in self.m.backbones], [], []
        while True:
            with self._lock:
                if not self._waiting:
                    break
                r = self._waiting[0]
                rows = r.rows_per_prompt * self.m.rows_per_sequence
                busy = len(self.seqs) * self.m.rows_per_sequence
                if busy and busy + rows > self.max_rows:
                    break
                p = r.waiting.popleft()
                if not r.waiting:
                    self._waiting.popleft()
            cached, base_lp, arm_lp = self._prefill(r.prompts[p])
            if r.options.temperature > 0 and p not in r.generators:
                r.generators[p] = torch.Generator(self.m.device).manual_seed(r.options.seed)
            for k in range(r.rows_per_prompt):
                self.seqs.append(_Seq.start(r, p, k, self.m.tokenizer))
                for b, entry in enumerate(cached):
                    entries[b].append(entry)
                base.append(base_lp)
                arms.append(arm_lp)
            r.running += r.rows_per_prompt
            r.started.set()
        if not base:
            return
        if not self.caches:
            self.caches = [Cache(bb) for bb in self.m.backbones]
        for cache, new in zip(self.caches, entries):
            cache.append(new)
        new_base, new_arms = torch.stack(base), torch.stack(arms)
        self.base_lp = new_base if self.base_lp is None else torch.cat([self.base_lp, new_base])
        self.arm_lp = new_arms if self.arm_lp is None else torch.cat([self.arm_lp, new_arms])

    def _prefill(self, ids: list[int]):
        """Cache entries per backbone and the first log-probs ([V], [N, V]) of one prompt."""
        key = tuple(ids)
        hit = self.prefix_cache.get(key)
        if hit is None:
            outputs = [bb.prefill(ids) for bb in self.m.backbones]
            entries = [e for e, _ in outputs]
            base_lp, arm_lp = self.m.split_rows([fusion.token_logprobs(lg) for _, lg in outputs])
            hit = (entries, base_lp[0], arm_lp[0])
            self.prefix_cache.put(key, hit)
        return hit

    def _drop_cancelled(self):
        gone = [i for i, s in enumerate(self.seqs) if s.request.cancelled.is_set()]
        if not gone:
            return
        by_request: dict[int, list[TokenEvent]] = {}
        for i in gone:
            s = self.seqs[i]
            by_request.setdefault(id(s.request), []).append(
                TokenEvent(s.prompt, s.pane, s.step, -1, "", float("nan"), {}, float("nan"),
                           s.request.panes[s.pane].weights, "cancelled"))
        self._remove(gone, by_request)

    def _choose_and_emit(self) -> torch.Tensor:
        """Fuses and samples one token for every sequence, emits the events, drops the finished."""
        m, seqs = self.m, self.seqs
        weights = [s.request.panes[s.pane].weights for s in seqs]
        w = torch.tensor([[ws.get(n, 0.0) for n in m.arm_names] for ws in weights],
                         device=m.device, dtype=torch.float32)
        opts = [s.request.options for s in seqs]
        score = fusion.fuse(self.base_lp, self.arm_lp, w, normalised=torch.tensor(
            [[o.normalised] for o in opts], device=m.device))
        ruled = fusion.penalise_repeats(score, [sorted(s.seen) if s.seen else [] for s in seqs],
                                        [o.repetition_penalty for o in opts])
        ruled = fusion.ban(ruled, [s.ngrams.banned() if s.ngrams else [] for s in seqs])
        tokens = fusion.sample(ruled, [o.temperature for o in opts], [o.top_k for o in opts],
                               [o.top_p for o in opts], self._uniforms(score.shape[-1]), [o.min_p for o in opts])
        pick = tokens[:, None]
        fused_lp = torch.log_softmax(score, -1).gather(-1, pick)  # (its rows do not depend on the batch)
        arm_pick = self.arm_lp.gather(-1, pick[:, None, :].expand(-1, self.arm_lp.shape[1], 1)).squeeze(-1)
        eos = torch.isin(tokens, torch.tensor(m.eos_ids or [-1], device=m.device))
        packed = torch.cat([tokens[:, None].float(), self.base_lp.gather(-1, pick), arm_pick, fused_lp,
                            eos[:, None].float()], -1).tolist()  # the one host sync of the step
        events: dict[int, list[TokenEvent]] = {}
        finished = []
        for i, (s, row) in enumerate(zip(seqs, packed)):
            token, lp_base, *lp_arms, lp_fused, is_eos = row
            token, last = int(token), s.step == s.request.options.max_new_tokens - 1
            s.push(token)
            if is_eos:
                text, reason = s.stop.push(s.detok.flush()) + s.stop.flush(), "eos"
            else:
                text = s.stop.push(s.detok.push(token))
                reason = "stop" if s.stop.stopped else None
                if reason is None and last:
                    text += s.stop.push(s.detok.flush()) + s.stop.flush()
                    reason = "length"
            events.setdefault(id(s.request), []).append(
                TokenEvent(s.prompt, s.pane, s.step, token, text, lp_base, dict(zip(m.arm_names, lp_arms)),
                           lp_fused, weights[i], reason))
            s.step += 1
            if reason:
                finished.append(i)
        keep = [i for i in range(len(seqs)) if i not in set(finished)]
        self._remove(finished, events)
        return tokens[keep] if finished else tokens

    def _uniforms(self, V: int) -> torch.Tensor | None:
        """One random draw per (stream, prompt) per step, shared by that prompt's panes."""
        groups: dict[tuple[int, int], int] = {}
        index, draws = [], []
        for s in self.seqs:
            g = s.request.generators.get(s.prompt)
            if g is None:
                index.append(-1)
                continue
            key = (id(s.request), s.prompt)
            if key not in groups:
                groups[key] = len(draws)
                draws.append(fusion.uniforms(g, V))
            index.append(groups[key])
        if not draws:
            return None
        table = torch.stack(draws + [draws[0].new_full((V,), 0.5)])  # row -1: greedy sequences
        return table[torch.tensor(index, device=table.device)]

    def _remove(self, rows: list[int], events: dict[int, list[TokenEvent]]):
        """Drops sequences at these batch positions and delivers the events of this step."""
        if rows:
            dead = set(rows)
            alive = [i for i in range(len(self.seqs)) if i not in dead]
            for i in rows:
                self.seqs[i].request.running -= 1
            requests = {id(self.seqs[i].request): self.seqs[i].request for i in range(len(self.seqs))}
            for cache in self.caches:
                cache.keep(alive)
            index = torch.tensor(alive, device=self.m.device, dtype=torch.long)
            self.base_lp, self.arm_lp = self.base_lp[index], self.arm_lp[index]
            self.seqs = [self.seqs[i] for i in alive]
        else:
            requests = {id(s.request): s.request for s in self.seqs}
        for rid, evs in events.items():
            r = requests[rid]
            r.out.put(evs)
            if r.running == 0 and not r.waiting:
                r.out.put(_END)

    def _forward(self, tokens: torch.Tensor):
        outputs = [fusion.token_logprobs(bb.step(cache, tokens)) for bb, cache in zip(self.m.backbones, self.caches)]
        self.base_lp, self.arm_lp = self.m.split_rows(outputs)
        self.steps += 1

    def _fail(self, error: Exception):
        requests = {id(s.request): s.request for s in self.seqs}
        self.seqs = []
        self._reset()
        for r in requests.values():
            r.out.put(error)

    def _reset(self):
        self.seqs, self.caches, self.base_lp, self.arm_lp = [], [], None, None


# ---- the engine -------------------------------------------------------------------------------
class Engine:
    def __init__(self, models: LoadedModels):
        self.models = models
        self.profile = models.profile
        self.tokenizer = models.tokenizer
        self.arm_names = models.arm_names
        self.prefix_cache = PrefixCache()
        self.scheduler = Scheduler(models, self.prefix_cache)

    @classmethod
    def from_profile(cls, name: str | None = None, config_path=None) -> "Engine":
        return cls(load_models(load_config(config_path).profile(name)))

    # ---- validation -------------------------------------------------------------------------
    def check_weights(self, weights: dict | None, normalised: bool = False) -> dict[str, float]:
        """Unknown names, non-numbers, NaN and values outside the ARM's range are refused;
        ARMs not named get weight 0 (off)."""
        if weights is not None and not isinstance(weights, dict):
            raise RequestError(f"weights: expected a mapping of ARM name to number, got {type(weights).__name__}")
        weights = dict(weights or {})
        unknown = set(weights) - set(self.arm_names)
        if unknown:
            raise RequestError(f"unknown ARM(s) {', '.join(sorted(map(str, unknown)))}; this profile's ARMs: "
                               f"{', '.join(self.arm_names) or 'none'}")
        out = {}
        for arm in self.profile.arms:
            w = weights.get(arm.name, 0.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise RequestError(f"weight of '{arm.name}': expected a number, got {w!r}")
            if not math.isfinite(w):
                raise RequestError(f"weight of '{arm.name}': expected a finite number, got {w}")
            if not arm.weight_min <= w <= arm.weight_max:
                raise RequestError(f"weight of '{arm.name}': {w} is outside its range "
                                   f"[{arm.weight_min}, {arm.weight_max}]")
            out[arm.name] = float(w)
        if normalised and 1.0 + sum(out.values()) <= 0:
            raise RequestError("normalised mode needs 1 + the sum of the weights to be > 0, "
                               f"got {1.0 + sum(out.values())}")
        return out

    def encode(self, prompt, max_new_tokens: int = 0) -> list[int]:
        if not isinstance(prompt, (str, list)) or prompt_is_empty(prompt):
            raise RequestError("prompt is empty")
        ids = prompt_ids(self.tokenizer, prompt, self.profile.chat_template, self.profile.system_prompt)
        return self.check_ids(ids, max_new_tokens)

    def check_ids(self, ids: list[int], max_new_tokens: int = 0) -> list[int]:
        limit = self.profile.max_prompt_tokens
        if not ids:
            raise RequestError("prompt is empty")
        if limit and len(ids) > limit:
            raise RequestError(f"prompt is {len(ids)} tokens; this profile accepts at most {limit}")
        context = self.models.context_length
        if len(ids) + max_new_tokens > context:
            raise RequestError(f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                               f"exceeds the model's context of {context} tokens")
        return ids

    # ---- decoding ---------------------------------------------------------------------------
    def stream(self, prompt, panes, options: SamplingOptions | None = None) -> Stream:
        """Streams one prompt under several panes (weight settings). The panes share their random
        draws, so panes with equal weights give equal text."""
        options = options or SamplingOptions()
        panes = self._panes(panes, options)
        return Stream(self, _Request([self.encode(prompt, options.max_new_tokens)], panes, options))

    def stream_ids(self, prompts: list[list[int]], panes, options: SamplingOptions | None = None) -> Stream:
        """Like `stream` for prompts already tokenised (several prompts: one request)."""
        options = options or SamplingOptions()
        panes = self._panes(panes, options)
        encoded = [self.check_ids(list(p), options.max_new_tokens) for p in prompts]
        if not encoded:
            raise RequestError("at least one prompt is needed")
        return Stream(self, _Request(encoded, panes, options))

    def _panes(self, panes, options) -> list[Pane]:
        panes = [p if isinstance(p, Pane) else Pane(p) for p in panes]
        if not panes:
            raise RequestError("at least one pane (weight setting) is needed")
        for p in panes:
            p.set_weights(self.check_weights(p.weights, options.normalised))
        return panes

    def generate(self, prompts, weights=None, options: SamplingOptions | None = None):
        """One-shot batched generation. weights: a dict (one setting: returns a Completion per
        prompt) or a list of dicts (panes: returns a list of Completions per prompt)."""
        options = options or SamplingOptions()
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                               and isinstance(prompts[0], dict))
        prompts = [prompts] if single else list(prompts)
        many = isinstance(weights, (list, tuple))
        panes = [Pane(self.check_weights(w, options.normalised)) for w in (weights if many else [weights])]
        encoded = [self.encode(p, options.max_new_tokens) for p in prompts]
        results = [[Completion() for _ in panes] for _ in prompts]
        for step in Stream(self, _Request(encoded, panes, options)):
            for ev in step:
                results[ev.prompt][ev.pane].add(ev)
        results = results if many else [r[0] for r in results]
        return results[0] if single else results

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, prompt, responses, add_eos: bool = True) -> list[dict[str, float]]:
        """Each ARM's trajectory reward beta * sum_t log pi_r(y_t | x, y_<t) of each response,
        the quantity the training loss compares (fusion.sequence_logprob)."""
        single = isinstance(responses, str)
        responses = [responses] if single else list(responses)
        ids = self.encode(prompt)
        eos_id = self.models.eos_ids[0] if add_eos and self.models.eos_ids else None
        seqs = [ids + response_ids(self.tokenizer, r, eos_id) for r in responses]
        logps = self.sequence_logprobs(seqs, [len(ids)] * len(seqs))
        out = [{n: self.models.betas[n] * float(logps[n][i]) for n in self.arm_names}
               for i in range(len(seqs))]
        return out[0] if single else out

    @torch.inference_mode()
    def sequence_logprobs(self, seqs: list[list[int]], prompt_lengths: list[int]) -> dict[str, torch.Tensor]:
        """Sum of each ARM's (and the base's, under "base") log-probs of the tokens after the prompt."""
        start = max(min(prompt_lengths), 1)  # log-probs from the first response position on
        width = max(map(len, seqs))
        resp = torch.tensor([[float(start + t >= n) for t in range(width - start)] for n in prompt_lengths],
                            device=self.models.device)
        per_backbone = WORKER.call(lambda: [bb.target_logprobs(seqs, start).to(self.models.device)
                                            for bb in self.models.backbones])
        out = {}
        for b, (bb, lp) in enumerate(zip(self.models.backbones, per_backbone)):
            for j, name in enumerate(self.models.row_names[b]):
                out[name] = (lp[:, j] * resp).sum(-1)
        return out
