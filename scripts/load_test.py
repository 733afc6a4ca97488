"""Load and fault test of the demo's server: many users at once, users joining a running stream,
cancels, disconnects, malformed requests, memory. Prints numbers and a summary of targets, each
marked met or missed; asserts nothing.

    python scripts/load_test.py [--users 8] [--tokens 48] [--many 32] [--memory-requests 1000] [--url URL]

Without --url it launches `app.py` on a free loopback port (the default profile) and stops it at
the end. Each user streams from the OpenAI-compatible route (/v1/chat/completions, n=2: two
sequences per user, as the page's base and steered panes) with the harmlessness weight 2; the
streams join the same engine batch as the page's. Sampling is seeded, so an answer (the text of
each of the two choices) is the same whatever else is in the batch. Phases, each bounded in count
and time:
  1. solo: each user's request alone, one after another (the reference answers, one user's speed
     and one user's time to first token, p50/p95);
  2. together: all users at once; per-user tokens/s, aggregate tokens/s against one user alone,
     time to first token (p50/p95) against solo, answers identical to solo, errors;
  3. joining: one long stream alone (its inter-token gaps, per choice), then the same stream again
     with the other users starting one by one while it runs: its gaps while they join and prefill
     (from the first joiner's start to the last joiner's first token) against its solo gaps;
  4. faults: clients that disconnect mid-stream, then a burst of malformed requests to the OpenAI
     routes and to the named Gradio API (/generate_json), each answered with a message;
  5. many: --many users at once with mixed lengths: some read to the end, some cancel (close the
     stream after a few chunks), some drop the socket (a reset); errors, and the finished answers
     against their solo answers (computed first, one after another);
  6. memory: the server's RSS after 20, 200 and --memory-requests short requests.
Before each phase that repeats earlier prompts (2, 3, 5) a few other one-token requests push them
out of the server's prefix cache, so their prefill is measured, not a cache hit. Phase 3 also
prints the stream's gaps once every user decodes and no prompt is written: what the batch's size
costs, apart from the prefill stall.
At the end: the targets with the measured values, the CPU and torch's thread count.
"""
import argparse
import json
import os
import random
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from genarm_core.kernels import _cpu_name
from genarm_core.native import cpu_flags
from genarm_core.runner import PrefixCache

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["tea", "rain", "bicycles", "cats", "maps", "jazz", "bread", "snow", "rivers", "chess", "bees",
          "clocks", "kites", "salt", "owls", "glass"]
MANY_TOKENS = (8, 12, 16, 24)  # max_tokens of the many-users phase, drawn per user (seeded)
MANY_ROLES = ("complete", "cancel", "complete", "disconnect")  # user i's role: MANY_ROLES[i % 4]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(port: int) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("app.py exited during start-up")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("app.py did not start within 600 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


PROFILE = "smollm2-135m"


def body(prompt: str, tokens: int, seed: int, weights=None, **extra) -> dict:
    """A streamed chat completion for the default profile: two choices (seeds seed, seed + 1)."""
    return {"model": PROFILE, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "seed": seed, "temperature": 0.7, "top_p": 0.9, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}, "weights": {"harmlessness": 2.0} if weights is None else weights,
            **extra}


def chunks(response):
    """The JSON chunks of a server-sent event stream; None for [DONE], the end."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                yield None
                return
            yield json.loads(line[6:])


def run_user(url, prompt, tokens, seed, out: dict, close_after=None, cancel_after=None, on_chunks=None):
    """Streams one request; records time to first token, each content chunk's arrival per choice,
    end time, answers and errors (a stream that ends without [DONE], unless the client left, is
    one). close_after: seconds after which the client goes away mid-stream (a disconnect);
    cancel_after: content chunks after which it closes the stream (a cancel); on_chunks: (k, event),
    the event set once k content chunks came."""
    t0 = time.perf_counter()
    first, texts, usage, error, done, left, count = None, ["", ""], None, None, False, False, 0
    stamps, status = ([], []), None
    try:
        with httpx.stream("POST", url + "v1/chat/completions", json=body(prompt, tokens, seed), timeout=900) as r:
            status = r.status_code
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.read()[:200]!r}")
            for chunk in chunks(r):
                if chunk is None:
                    done = True
                    break
                if "error" in chunk:
                    error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    text = choice["delta"].get("content") or ""
                    if text:
                        now = time.perf_counter()
                        first = first or now
                        stamps[choice["index"]].append(now)
                        count += 1
                    texts[choice["index"]] += text
                usage = chunk.get("usage") or usage
                if on_chunks and count >= on_chunks[0]:
                    on_chunks[1].set()
                if (close_after is not None and time.perf_counter() - t0 > close_after or
                        cancel_after is not None and count >= cancel_after):
                    left = True
                    break
        end = time.perf_counter()
        if not done and not left and error is None:
            error = "stream ended without [DONE]"
        out.update(t0=t0, first=first or end, end=end, tokens=usage["completion_tokens"] if usage else 0,
                   answer=tuple(texts), error=error, done=done, status=status, stamps=stamps, chunks=count)
    except Exception as e:  # noqa: BLE001 - counted, not raised
        out.update(t0=t0, first=None, end=time.perf_counter(), tokens=0, answer=None, error=repr(e)[:200],
                   done=False, status=status, stamps=stamps, chunks=count)
    if on_chunks:
        on_chunks[1].set()


def run_abrupt(url, prompt, tokens, seed, out: dict, after_chunks: int):
    """Streams one request over a bare socket and, after after_chunks content chunks, drops it with a
    reset (SO_LINGER 0: no goodbye). Errors: a status other than 200, or a stream that ended early."""
    u = httpx.URL(url)
    https = u.scheme == "https"
    payload = json.dumps(body(prompt, tokens, seed)).encode()
    head = (f"POST {u.raw_path.decode().rstrip('/')}/v1/chat/completions HTTP/1.1\r\nHost: {u.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    t0, status, error, buf, seen = time.perf_counter(), None, None, b"", 0
    s = None
    try:
        s = socket.create_connection((u.host, u.port or (443 if https else 80)), timeout=300)
        if https:
            s = ssl.create_default_context().wrap_socket(s, server_hostname=u.host)
        s.sendall(head.encode() + payload)
        while seen < after_chunks:
            data = s.recv(65536)
            if not data:
                break
            buf += data
            if status is None and b"\r\n" in buf:
                status = int(buf.split(b"\r\n", 1)[0].split()[1])
                if status != 200:
                    error = f"{status} {buf[:200]!r}"
                    break
            seen = buf.count(b'"delta": {"content": ')
        if error is None and seen < after_chunks and b"data: [DONE]" not in buf:
            error = f"stream ended after {seen} chunks"
    except Exception as e:  # noqa: BLE001 - counted, not raised
        error = repr(e)[:200]
    finally:
        if s is not None:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            s.close()
    out.update(t0=t0, first=None, end=time.perf_counter(), tokens=0, answer=None, error=error, done=False,
               status=status, stamps=([], []), chunks=seen)


MALFORMED = [  # (what is wrong, the body's changed fields)
    ("prompt too long", {"messages": [{"role": "user", "content": "x" * 5000}]}),
    ("seed too large", {"seed": 2 ** 80}),
    ("seed negative", {"seed": -5}),
    ("too many tokens", {"max_tokens": 10 ** 6}),
    ("model not offered", {"model": "no-such-profile"}),
    ("unknown ARM", {"weights": {"lots": 1.0}}),
    ("weight not a number", {"weights": {"harmlessness": "lots"}}),
    ("empty prompt", {"messages": [{"role": "user", "content": "   "}]}),
    ("n too large", {"n": 99}),
    ("unknown field", {"logit_bias": {"1": 5}}),
]


def malformed(url, client_factory) -> tuple[int, int, list]:
    """Bad requests to the OpenAI route and to the named API: (answered with a message, sent, raised)."""
    refused, sent, crashed = 0, 0, []
    for _, change in MALFORMED * 2:
        sent += 1
        try:
            r = httpx.post(url + "v1/chat/completions", json={**body("hi", 8, 0), "stream": False, **change},
                           timeout=120)
            refused += r.status_code in (400, 404) and bool(r.json()["error"]["message"])
        except Exception as e:  # noqa: BLE001
            crashed.append(repr(e)[:120])
    for fields in ({"seed": 2 ** 80}, {"weights": {"lots": 1.0}}, {"max_new_tokens": 10 ** 6}, {"top_p": 0.0}):
        sent += 1
        try:
            client_factory().predict(prompt="hi", **fields, api_name="/generate_json")
        except Exception as e:  # noqa: BLE001 - the named API raises the server's message
            refused += "Traceback" not in str(e) and any(name in str(e) for name in fields)
    return refused, sent, crashed


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def gaps(out: dict, start=float("-inf"), stop=float("inf")) -> list:
    """The gaps between one request's consecutive content chunks of each choice (its inter-token
    gaps), those that end within [start, stop]."""
    return [b - a for s in out.get("stamps", ()) for a, b in zip(s, s[1:]) if start <= b <= stop]


def evict(url, n: int = PrefixCache().size):
    """n requests of other prompts, one token each, one after another: the server's prefix cache
    (the last few prompts' caches, runner.PrefixCache) then holds none of the measured prompts, so
    a phase that repeats prompts measures their prefill, not a cache hit."""
    for i in range(n):
        run_user(url, f"Spell the word number {i} backwards: {random.randrange(10 ** 9)}.", 1, i, {})


def start_all(targets) -> None:
    """Runs (function, args, kwargs) each in a thread, all at once, and waits for them."""
    threads = [threading.Thread(target=f, args=a, kwargs=k) for f, a, k in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(900)


def many_plan(count: int, seed: int = 0) -> list[dict]:
    """The many-users phase's users: prompt, max_tokens (seeded draw), seed, role and chunks read
    before a cancel or disconnect."""
    rng = random.Random(seed)
    return [{"prompt": f"Write two lines about {TOPICS[i % len(TOPICS)]} ({i}).", "tokens": rng.choice(MANY_TOKENS),
             "seed": 500 + 2 * i, "role": MANY_ROLES[i % len(MANY_ROLES)], "k": rng.randint(1, 4)}
            for i in range(count)]


def identical(outs: list[dict], refs: list[dict]) -> int:
    """How many requests got an answer, the same as their reference's (pairwise)."""
    return sum(o.get("answer") is not None and o["answer"] == r["answer"] for o, r in zip(outs, refs))


def verdict(ok) -> str:
    return "n/a" if ok is None else "met" if ok else "missed"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--url")
    ap.add_argument("--long-tokens", type=int, help="the joined stream's tokens per choice (max(2 x tokens, 32))")
    ap.add_argument("--stagger", type=float, default=0.3, help="seconds between the joining users' starts")
    ap.add_argument("--many", type=int, default=32, help="users of the many-users phase (0: skip it)")
    ap.add_argument("--memory-requests", type=int, default=1000)
    ap.add_argument("--memory-tokens", type=int, default=4, help="tokens per choice of the memory phase's requests")
    args = ap.parse_args()
    from gradio_client import Client

    proc = None
    if args.url:
        url, pid = args.url if args.url.endswith("/") else args.url + "/", None
    else:
        port = free_port()
        t = time.perf_counter()
        proc = launch(port)
        url, pid = f"http://127.0.0.1:{port}/", proc.pid
        print(f"launched app.py (pid {pid}) in {time.perf_counter() - t:.1f} s")
    client = lambda: Client(url, verbose=False)  # noqa: E731
    summary = []  # (target, measured, met: True/False/None)
    try:
        prompts = [f"Tell me three facts about {TOPICS[i % len(TOPICS)]}." for i in range(args.users)]
        run_user(url, "Say hello.", 4, 0, {})  # warm-up
        # 1. solo
        solo = []
        for i, p in enumerate(prompts):
            out = {}
            run_user(url, p, args.tokens, i, out)
            solo.append(out)
        solo_rate = [o["tokens"] / (o["end"] - o["t0"]) for o in solo if o["tokens"]]
        one_user = statistics.median(solo_rate)
        solo_ttft = [o["first"] - o["t0"] for o in solo if o.get("first")]
        solo_errors = [o["error"] for o in solo if o.get("error")]
        print(f"\n1. solo: {len(solo)} requests one after another, one user's throughput "
              f"{one_user:.1f} tok/s (median; tokens of both choices over the request's wall time); "
              f"time to first token p50 {pct(solo_ttft, 0.5):.2f} s, p95 {pct(solo_ttft, 0.95):.2f} s; "
              f"{len(solo_errors)} errors {solo_errors[:3]}")
        # 2. together
        evict(url)
        together = [dict() for _ in prompts]
        t = time.perf_counter()
        start_all([(run_user, (url, p, args.tokens, i, together[i]), {}) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - t
        total = sum(o.get("tokens", 0) for o in together)
        same = identical(together, solo)
        errors = [o["error"] for o in together if o.get("error")]
        ttft = [o["first"] - o["t0"] for o in together if o.get("first")]
        print(f"\n2. together: {args.users} users at once, {args.tokens} tokens per choice, 2 choices")
        print("| user | tokens | tokens/s | time to first token (s) | identical to solo |\n|---|---|---|---|---|")
        for i, (o, s) in enumerate(zip(together, solo)):
            rate = o["tokens"] / (o["end"] - o["first"]) if o.get("tokens") and o["end"] > o["first"] else 0
            print(f"| {i} | {o.get('tokens', 0)} | {rate:.1f} | {o['first'] - o['t0'] if o.get('first') else float('nan'):.2f} | "
                  f"{o.get('answer') == s['answer']} |")
        speedup = total / wall / one_user
        ttft_ratio = pct(ttft, 0.95) / pct(solo_ttft, 0.95)
        print(f"\naggregate {total / wall:.1f} tok/s over {wall:.1f} s = {speedup:.2f}x one user alone; "
              f"time to first token p50 {pct(ttft, 0.5):.2f} s, p95 {pct(ttft, 0.95):.2f} s "
              f"(solo p50 {pct(solo_ttft, 0.5):.2f} s, p95 {pct(solo_ttft, 0.95):.2f} s: "
              f"p95 {ttft_ratio:.2f}x solo p95, "
              f"{pct(ttft, 0.95) / pct(solo_ttft, 0.5):.2f}x solo p50); "
              f"{same}/{args.users} answers identical to solo; {len(errors)} errors {errors[:3]}")
        summary += [(f"{args.users} users >= 4x one user", f"{speedup:.2f}x", speedup >= 4),
                    (f"{args.users}/{args.users} identical to solo", f"{same}/{args.users}", same == args.users),
                    (f"0 errors ({args.users} users)", f"{len(errors)}", not errors),
                    (f"TTFT p95 {args.users} at once <= 2x solo TTFT p95",
                     f"{pct(ttft, 0.95):.2f} s / {pct(solo_ttft, 0.95):.2f} s = {ttft_ratio:.2f}x", ttft_ratio <= 2)]
        # 3. joining: one long stream, alone and then with the other users joining while it runs
        long_tokens = args.long_tokens or max(2 * args.tokens, 32)
        lead_seed, warm_chunks = 1000, 8  # the others start after its 8th content chunk (4 tokens per choice)
        alone = {}
        run_user(url, prompts[0], long_tokens, lead_seed, alone)
        solo_gaps = gaps(alone)
        evict(url)
        lead, others, ready = {}, [dict() for _ in prompts[1:]], threading.Event()
        lead_thread = threading.Thread(target=run_user, args=(url, prompts[0], long_tokens, lead_seed, lead),
                                       kwargs={"on_chunks": (warm_chunks, ready)})
        lead_thread.start()
        ready.wait(300)
        join_start, joiners = time.perf_counter(), []
        for i, p in enumerate(prompts[1:], 1):
            th = threading.Thread(target=run_user, args=(url, p, args.tokens, i, others[i - 1]))
            th.start()
            joiners.append(th)
            time.sleep(args.stagger)
        for th in joiners:
            th.join(900)
        lead_thread.join(900)
        firsts = [o["first"] for o in others if o.get("first")]
        join_end = max(firsts) if firsts else time.perf_counter()
        join_gaps = gaps(lead, join_start, join_end)
        # the same batch decoding with no prompt being written: from the last joiner's first token
        # until the first joiner ends (what the batch's size alone costs a running stream)
        ends = [o["end"] for o in others if o.get("end")]
        full_gaps = gaps(lead, join_end, min(ends)) if ends else []
        lead_end = max((s[-1] for s in lead.get("stamps", ()) if s), default=float("nan"))
        itl_ratio = pct(join_gaps, 0.95) / pct(solo_gaps, 0.95)
        joined_same = identical(others, solo[1:])
        join_errors = [o["error"] for o in [lead, *others] if o.get("error")]
        print(f"\n3. joining: one stream of {long_tokens} tokens per choice; after its {warm_chunks}th chunk "
              f"{len(others)} users ({args.tokens} tokens) start, one every {args.stagger:.1f} s; its inter-token gaps "
              f"(per choice) while they join and prefill ({join_end - join_start:.1f} s, {len(join_gaps)} gaps) "
              f"p50 {pct(join_gaps, 0.5) * 1000:.0f} ms, p95 {pct(join_gaps, 0.95) * 1000:.0f} ms; alone p50 "
              f"{pct(solo_gaps, 0.5) * 1000:.0f} ms, p95 {pct(solo_gaps, 0.95) * 1000:.0f} ms; "
              f"p95 {itl_ratio:.2f}x alone")
        if full_gaps:
            print(f"   with all {args.users} decoding and no prompt written ({len(full_gaps)} gaps): p50 "
                  f"{pct(full_gaps, 0.5) * 1000:.0f} ms, p95 {pct(full_gaps, 0.95) * 1000:.0f} ms; joining p95 "
                  f"{pct(join_gaps, 0.95) / pct(full_gaps, 0.95):.2f}x that (the stall prompts add beyond the batch's size)")
        if lead_end < join_end:
            print(f"   the stream ended {join_end - lead_end:.1f} s before the last user's first token: "
                  f"raise --long-tokens for a full window")
        print(f"   its answer identical to alone: {lead.get('answer') == alone.get('answer')}; joiners identical to "
              f"solo {joined_same}/{len(others)}; {len(join_errors)} errors {join_errors[:3]}")
        summary.append(("ITL p95 while others join <= 2x solo",
                        f"{pct(join_gaps, 0.95) * 1000:.0f} ms / {pct(solo_gaps, 0.95) * 1000:.0f} ms = "
                        f"{itl_ratio:.2f}x "
                        f"({len(join_gaps)} gaps)", itl_ratio <= 2 if join_gaps else None))
        # 4. faults: clients that go away after 0.3 s (first tokens) or after 1 s, mid-stream
        dropped = [dict() for _ in range(8)]
        start_all([(run_user, (url, prompts[i % len(prompts)], 200, 100 + i, dropped[i]),
                    {"close_after": 0.3 if i < 4 else 1.0}) for i in range(8)])
        refused, sent, crashed = malformed(url, client)
        after = {}
        run_user(url, prompts[0], args.tokens, 0, after)
        print(f"\n4. faults: {len(dropped)} clients disconnected mid-stream; {refused}/{sent} malformed requests "
              f"refused with a message naming the field, {len(crashed)} raised {crashed[:2]}; afterwards user 0's "
              f"answer identical to solo: {after.get('answer') == solo[0]['answer']}")
        # 5. many users at once: mixed lengths, cancels and dropped sockets
        if args.many:
            plan = many_plan(args.many)
            t = time.perf_counter()
            refs = {}
            for i, u in enumerate(plan):
                if u["role"] == "complete":
                    refs[i] = {}
                    run_user(url, u["prompt"], u["tokens"], u["seed"], refs[i])
            ref_wall = time.perf_counter() - t
            evict(url)
            outs = [dict() for _ in plan]
            targets = []
            for i, u in enumerate(plan):
                a = (url, u["prompt"], u["tokens"], u["seed"], outs[i])
                targets.append((run_user, a, {}) if u["role"] == "complete" else
                               (run_user, a, {"cancel_after": u["k"]}) if u["role"] == "cancel" else
                               (run_abrupt, a, {"after_chunks": u["k"]}))
            t = time.perf_counter()
            start_all(targets)
            many_wall = time.perf_counter() - t
            many_errors = [(i, plan[i]["role"], o["error"]) for i, o in enumerate(outs) if o.get("error")]
            bad = [(i, outs[i].get("answer"), r.get("answer")) for i, r in refs.items()
                   if outs[i].get("answer") != r.get("answer") or r.get("error")]
            many_same = len(refs) - len(bad)
            roles = {r: sum(u["role"] == r for u in plan) for r in MANY_ROLES}
            after = {}
            run_user(url, prompts[0], args.tokens, 0, after)
            print(f"\n5. many: {args.many} users at once ({roles['complete']} read to the end, "
                  f"{roles['cancel']} cancel "
                  f"after 1-4 chunks, {roles['disconnect']} drop the socket), max_tokens from {MANY_TOKENS}; "
                  f"solo answers first in {ref_wall:.1f} s, then all at once in {many_wall:.1f} s; "
                  f"{len(many_errors)} errors {many_errors[:3]}; finished answers identical to solo "
                  f"{many_same}/{len(refs)}; afterwards user 0's answer identical to solo: "
                  f"{after.get('answer') == solo[0]['answer']}")
            for i, got, want in bad[:3]:
                print(f"   user {i} ({plan[i]['tokens']} tokens, seed {plan[i]['seed']}): got {got!r}, solo {want!r}")
            summary.append((f"{args.many} users: 0 errors, identical to solo",
                            f"{len(many_errors)} errors, {many_same}/{len(refs)} identical",
                            not many_errors and many_same == len(refs)))
        else:
            summary.append(("32 users: 0 errors, identical to solo", "not run (--many 0)", None))
        # 6. memory
        if pid:
            n, marks, done, lock = args.memory_requests, {}, 0, threading.Lock()
            mem_errors = []

            def short(i):
                nonlocal done
                out = {}
                run_user(url, f"Name a colour, please ({i}).", args.memory_tokens, i, out)
                with lock:
                    done += 1
                    if out.get("error"):
                        mem_errors.append(out["error"])

            t = time.perf_counter()
            for start in range(0, n, 8):
                start_all([(short, (i,), {}) for i in range(start, min(n, start + 8))])
                for mark in (20, 200):
                    if done >= mark and mark not in marks:
                        marks[mark] = rss_mb(pid)
            marks[n] = rss_mb(pid)
            line = ", ".join(f"{marks[m]:.0f} MB after {m}" for m in sorted(marks))
            change = (marks[n] / marks[200] - 1) * 100 if 200 in marks and n > 200 else None
            print(f"\n6. memory: {n} requests of {args.memory_tokens} tokens per choice, 8 at a time, in "
                  f"{time.perf_counter() - t:.1f} s; server RSS {line}"
                  f"{f' ({change:+.1f}% from 200 to {n})' if change is not None else ''}; "
                  f"{len(mem_errors)} errors {mem_errors[:3]}")
            summary.append((f"RSS 200->{n} requests within 5%",
                            f"{change:+.1f}%" if change is not None else f"not measured ({n} requests)",
                            abs(change) <= 5 if change is not None else None))
        else:
            summary.append(("RSS 200->1000 requests within 5%", "not measured (--url: no server pid)", None))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    avx512 = "avx512f" in (cpu_flags() or ())
    print("\nsummary (target: measured, met or missed)")
    width = max(len(target) for target, _, _ in summary)
    for target, measured, ok in summary:
        print(f"  {target:<{width}}  {measured:<40}  {verdict(ok)}")
    print(f"  cpu: {_cpu_name()}, {os.cpu_count()} cpus, avx512f: {'yes' if avx512 else 'no'}; torch threads: "
          f"{torch.get_num_threads()} (torch's default in this environment)")


if __name__ == "__main__":
    main()
