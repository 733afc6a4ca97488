"""The fused decoding engine: the public API (Engine) and the loop that runs every stream.

Each step, on the worker thread (worker.py), EngineCore runs four parts in turn:
- scheduler.py decides what runs: waiting prompts join while their rows fit (max_rows), and a
  budget of tokens per step is shared by the running sequences' next tokens and prompt chunks;
- runner.py runs it: one forward of each backbone over the step's decode tokens and prompt chunks
  together (with the native kernels; else prompts whole and alone), the base and every LoRA ARM
  as rows (backbone.py); standalone ARMs are backbones of their own;
- sampler.py fuses the log-probs under each pane's weights (read now, so they may change between
  two tokens) and samples with each request's options and random generator (fusion.py's math);
- output.py detokenises, applies stop strings and delivers the events.

A stream's tokens do not depend on what else runs: every row is computed on its own (native
kernels, or forms checked batch-invariant: kernels.py), a prompt's chunks give the same cache
as writing it whole, and its random draws come from its own generator.
"""
from __future__ import annotations

import math

import torch

from . import output, sampler
from .config import load_config
from .errors import RequestError
from .models import LoadedModels, load_models
from .options import SamplingOptions
from .prompts import prompt_ids, prompt_is_empty, response_ids
from .runner import ModelRunner, PrefixCache
from .scheduler import Group, Scheduler, Sequence
from .streams import (END, Completion, FinishReason, Pane, PromptState, Request, Stream,  # noqa: F401 - re-exported
                      TokenEvent)
from .worker import WORKER


class EngineCore:
    """The loop of one engine: admission, one step's forwards, sampling, output (module doc).
    run_once is called by the worker thread while there is work."""

    def __init__(self, models: LoadedModels, prefix_cache: PrefixCache):
        self.m = models
        self.runner = ModelRunner(models, prefix_cache)
        cpu = models.device.type == "cpu"
        budget = models.profile.engine.step_tokens or (32 if cpu else 2048)
        self.scheduler = Scheduler(models.rows_per_sequence, models.max_rows, budget, chunked=self.runner.ragged)
        self.steps = 0  # steps run (for tests and monitoring)

    # -- any thread
    def submit(self, request: Request):
        self.scheduler.submit(request)
        WORKER.wake(self)

    def wake(self):
        WORKER.wake(self)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def waiting(self) -> int:
        return self.scheduler.waiting

    @property
    def rows_in_flight(self) -> int:
        return self.scheduler.rows_in_flight

    @property
    def caches(self):
        return self.runner.caches

    # -- the worker thread
    def run_once(self) -> bool:
        """One step; False when there was nothing to do."""
        if not self.has_work():
            self.runner.reset()
            return False
        try:
            with torch.inference_mode():
                self._step()
        except Exception as e:  # noqa: BLE001 - delivered to every stream in the batch
            self._fail(e)
        return True

    def _step(self):
        self._drop_cancelled()
        groups = self.scheduler.admit(self._group)
        ready = self.runner.admit(groups)
        for g in groups:
            if g.complete:  # found in the prefix cache
                self.scheduler.written(g, len(g.ids))
        plan = self.scheduler.plan()
        more, written = self.runner.run(plan)
        for g, upto in written:
            self.scheduler.written(g, upto)
        ready += more
        if not ready:
            return
        self.steps += 1
        seqs = [r.seq for r in ready]
        events, requests, finished = output.emit(seqs, sampler.choose(self.m, ready), self.m.arm_names)
        self._end(finished, events, requests)

    def _group(self, request: Request, prompt: int) -> Group:
        if request.options.temperature > 0 and prompt not in request.generators:
            request.generators[prompt] = torch.Generator(self.m.device).manual_seed(request.options.seed)
        seqs = [Sequence(request, prompt, k, output.OutputState.start(request, prompt, self.m.tokenizer))
                for k in range(request.rows_per_prompt)]
        return Group(request, prompt, request.prompts[prompt], seqs)

    def _end(self, finished: list[Sequence], events: dict, requests: dict):
        """Finished sequences leave (their rows and cache slots freed); then the step's events go out."""
        self.scheduler.finish(finished)
        self.runner.free(finished)
        output.deliver(requests, events)

    def _drop_cancelled(self):
        for r in self.scheduler.take_cancelled_waiting():
            r.started.set()
            events = [ev for p in r.waiting for ev in r.final_events(p, FinishReason.CANCELLED)]
            r.waiting.clear()
            if events:
                r.out.put(events)
            if r.running == 0:
                r.out.put(END)
        events, requests, gone = {}, {}, []
        for g in [g for g in self.scheduler.prefilling if g.request.cancelled.is_set()]:
            self.scheduler.drop_group(g)
            self.runner.free(g.seqs)
            requests[id(g.request)] = g.request
            events.setdefault(id(g.request), []).extend(output.cancelled_event(s) for s in g.seqs)
        for s in [s for s in self.scheduler.running if s.request.cancelled.is_set()]:
            gone.append(s)
            requests[id(s.request)] = s.request
            events.setdefault(id(s.request), []).append(output.cancelled_event(s))
        self._end(gone, events, requests)

    def _fail(self, error: Exception):
        requests = self.scheduler.reset()
        self.runner.reset()
        for r in requests:
            r.out.put(error)


# ---- the engine -------------------------------------------------------------------------------
class Engine:
    def __init__(self, models: LoadedModels):
        self.models = models
        self.profile = models.profile
        self.tokenizer = models.tokenizer
        self.arm_names = models.arm_names
        self.prefix_cache = PrefixCache()
        self.core = EngineCore(models, self.prefix_cache)
        self.scheduler = self.core  # (the name callers used: waiting, rows_in_flight, steps, caches)

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
        return Stream(self.core, Request([self.encode(prompt, options.max_new_tokens)], panes, options))

    def stream_ids(self, prompts: list[list[int]], panes, options: SamplingOptions | None = None) -> Stream:
        """Like `stream` for prompts already tokenised (several prompts: one request)."""
        options = options or SamplingOptions()
        panes = self._panes(panes, options)
        encoded = [self.check_ids(list(p), options.max_new_tokens) for p in prompts]
        if not encoded:
            raise RequestError("at least one prompt is needed")
        return Stream(self.core, Request(encoded, panes, options))

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
        for step in Stream(self.core, Request(encoded, panes, options)):
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
