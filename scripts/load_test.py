"""Load and fault test of the demo's server: many users at once, cancels, disconnects, malformed
requests, memory. Prints numbers; asserts nothing.

    python scripts/load_test.py [--users 8] [--tokens 48] [--url http://127.0.0.1:7860]

Without --url it launches `app.py` on a free loopback port (the default profile) and stops it at
the end. Each user streams from the OpenAI-compatible route (/v1/chat/completions, n=2: two
sequences per user, as the page's base and steered panes) with the harmlessness weight 2; the
streams join the same engine batch as the page's. Phases, each bounded in count and time:
  1. solo: each user's request alone, one after another (the reference answers and one user's speed);
  2. together: all users at once; per-user tokens/s, aggregate tokens/s against one user alone,
     time to first token (p50/p95), answers identical to solo, errors;
  3. faults: clients that disconnect mid-stream, then a burst of malformed requests to the OpenAI
     routes and to the named Gradio API (/generate_json), each answered with a message;
  4. memory: the server's RSS after 20 and after 200 short requests.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["tea", "rain", "bicycles", "cats", "maps", "jazz", "bread", "snow", "rivers", "chess", "bees",
          "clocks", "kites", "salt", "owls", "glass"]


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
    """The JSON chunks of a server-sent event stream, until [DONE]."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield json.loads(line[6:])


def run_user(url, prompt, tokens, seed, out: dict, close_after=None):
    """Streams one request; records time to first token, end time, answers and errors. close_after:
    seconds after which the client goes away mid-stream (a disconnect)."""
    t0 = time.perf_counter()
    first, texts, usage, error = None, ["", ""], None, None
    try:
        with httpx.stream("POST", url + "v1/chat/completions", json=body(prompt, tokens, seed), timeout=900) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.read()[:200]!r}")
            for chunk in chunks(r):
                if "error" in chunk:
                    error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    text = choice["delta"].get("content") or ""
                    if text and first is None:
                        first = time.perf_counter()
                    texts[choice["index"]] += text
                usage = chunk.get("usage") or usage
                if close_after is not None and time.perf_counter() - t0 > close_after:
                    break
        end = time.perf_counter()
        out.update(t0=t0, first=first or end, end=end, tokens=usage["completion_tokens"] if usage else 0,
                   answer=tuple(texts), error=error)
    except Exception as e:  # noqa: BLE001 - counted, not raised
        out.update(t0=t0, first=None, end=time.perf_counter(), tokens=0, answer=None, error=repr(e)[:200])


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--url")
    ap.add_argument("--memory-requests", type=int, default=200)
    args = ap.parse_args()
    from gradio_client import Client

    proc = None
    if args.url:
        url, pid = args.url, None
    else:
        port = free_port()
        t = time.perf_counter()
        proc = launch(port)
        url, pid = f"http://127.0.0.1:{port}/", proc.pid
        print(f"launched app.py (pid {pid}) in {time.perf_counter() - t:.1f} s")
    client = lambda: Client(url, verbose=False)  # noqa: E731
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
        print(f"\n1. solo: {len(solo)} requests one after another, one user's throughput "
              f"{one_user:.1f} tok/s (median; tokens of both choices over the request's wall time)")
        # 2. together
        together = [dict() for _ in prompts]
        threads = [threading.Thread(target=run_user, args=(url, p, args.tokens, i, together[i]))
                   for i, p in enumerate(prompts)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(900)
        wall = time.perf_counter() - t
        total = sum(o.get("tokens", 0) for o in together)
        same = sum(o.get("answer") is not None and o["answer"] == s["answer"] for o, s in zip(together, solo))
        errors = [o["error"] for o in together if o.get("error")]
        ttft = [o["first"] - o["t0"] for o in together if o.get("first")]
        print(f"\n2. together: {args.users} users at once, {args.tokens} tokens per choice, 2 choices")
        print("| user | tokens | tokens/s | time to first token (s) | identical to solo |\n|---|---|---|---|---|")
        for i, (o, s) in enumerate(zip(together, solo)):
            rate = o["tokens"] / (o["end"] - o["first"]) if o.get("tokens") and o["end"] > o["first"] else 0
            print(f"| {i} | {o.get('tokens', 0)} | {rate:.1f} | {o['first'] - o['t0'] if o.get('first') else float('nan'):.2f} | "
                  f"{o.get('answer') == s['answer']} |")
        print(f"\naggregate {total / wall:.1f} tok/s over {wall:.1f} s = {total / wall / one_user:.2f}x one user alone; "
              f"time to first token p50 {pct(ttft, 0.5):.2f} s, p95 {pct(ttft, 0.95):.2f} s; "
              f"{same}/{args.users} answers identical to solo; {len(errors)} errors {errors[:3]}")
        # 3. faults: clients that go away after 0.3 s (first tokens) or after 1 s, mid-stream
        dropped = [dict() for _ in range(8)]
        threads = [threading.Thread(target=run_user, args=(url, prompts[i % len(prompts)], 200, 100 + i, dropped[i]),
                                    kwargs={"close_after": 0.3 if i < 4 else 1.0}) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        refused, sent, crashed = malformed(url, client)
        after = {}
        run_user(url, prompts[0], args.tokens, 0, after)
        print(f"\n3. faults: {len(dropped)} clients disconnected mid-stream; {refused}/{sent} malformed requests "
              f"refused with a message naming the field, {len(crashed)} raised {crashed[:2]}; afterwards user 0's "
              f"answer identical to solo: {after.get('answer') == solo[0]['answer']}")
        # 4. memory
        if pid:
            marks = {}
            done = 0
            lock = threading.Lock()

            def short(i):
                nonlocal done
                out = {}
                run_user(url, f"Name a colour, please ({i}).", 8, i, out)
                with lock:
                    done += 1

            n = args.memory_requests
            for start in range(0, n, 8):
                batch = [threading.Thread(target=short, args=(i,)) for i in range(start, min(n, start + 8))]
                for th in batch:
                    th.start()
                for th in batch:
                    th.join(300)
                if done >= 20 and 20 not in marks:
                    marks[20] = rss_mb(pid)
            marks[n] = rss_mb(pid)
            print(f"\n4. memory: server RSS {marks[20]:.0f} MB after 20 requests, {marks[n]:.0f} MB after {n} "
                  f"({(marks[n] / marks[20] - 1) * 100:+.1f}%)")
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
