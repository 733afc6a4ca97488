"""Load and fault test of the demo: many users at once, cancels, disconnects, malformed requests,
memory. Prints numbers; asserts nothing.

    python scripts/load_test.py [--users 8] [--tokens 48] [--url http://127.0.0.1:7860]

Without --url it launches `app.py` on a free loopback port (the default profile) and stops it at
the end. Phases, each bounded in count and time:
  1. solo: each user's request alone, one after another (the reference answers and one user's speed);
  2. together: all users at once; per-user tokens/s, aggregate tokens/s against one user alone,
     time to first token (p50/p95), answers identical to solo, errors;
  3. faults: cancels and disconnects mid-stream, then a burst of malformed requests;
  4. memory: the server's RSS after 20 and after 200 short requests.
"""
import argparse
import html
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def text_of(pane_html: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", pane_html or ""))


def request(prompt: str, tokens: int, seed: int, weights=(0.0, 2.0)) -> tuple:
    """The /generate endpoint's inputs for the default profile (both panes, sampling)."""
    return ("smollm2-135m", prompt, False, 0.7, 0.9, tokens, seed, False, *weights, 0.0, 0.0)


def run_user(client_factory, prompt, tokens, seed, out: dict):
    """Streams one request; records time to first token, end time, answers and errors."""
    t0 = time.perf_counter()
    try:
        job = client_factory().submit(*request(prompt, tokens, seed), api_name="/generate")
        first = None
        for update in job:
            if first is None and (text_of(update[0]) or text_of(update[1])):
                first = time.perf_counter()
        final = job.result()
        end = time.perf_counter()
        n = sum(int(s.split()[0]) for s in final[3:5] if s and s.split()[0].isdigit())
        ok = "Done" in final[6]
        out.update(t0=t0, first=first or end, end=end, tokens=n, answer=(text_of(final[0]), text_of(final[1])),
                   error=None if ok else final[6][:200])
    except Exception as e:  # noqa: BLE001 - counted, not raised
        out.update(t0=t0, first=None, end=time.perf_counter(), tokens=0, answer=None, error=repr(e)[:200])


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
        client().predict(*request("Say hello.", 4, 0), api_name="/generate")  # warm-up
        # 1. solo
        solo = []
        for i, p in enumerate(prompts):
            out = {}
            run_user(client, p, args.tokens, i, out)
            solo.append(out)
        solo_rate = [o["tokens"] / (o["end"] - o["t0"]) for o in solo if o["tokens"]]
        one_user = statistics.median(solo_rate)
        print(f"\n1. solo: {len(solo)} requests one after another, one user's throughput "
              f"{one_user:.1f} tok/s (median; tokens of both panes over the request's wall time)")
        # 2. together
        together = [dict() for _ in prompts]
        threads = [threading.Thread(target=run_user, args=(client, p, args.tokens, i, together[i]))
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
        print(f"\n2. together: {args.users} users at once, {args.tokens} tokens per pane, 2 panes")
        print("| user | tokens | tokens/s | time to first token (s) | identical to solo |\n|---|---|---|---|---|")
        for i, (o, s) in enumerate(zip(together, solo)):
            rate = o["tokens"] / (o["end"] - o["first"]) if o.get("tokens") and o["end"] > o["first"] else 0
            print(f"| {i} | {o.get('tokens', 0)} | {rate:.1f} | {o['first'] - o['t0'] if o.get('first') else float('nan'):.2f} | "
                  f"{o.get('answer') == s['answer']} |")
        print(f"\naggregate {total / wall:.1f} tok/s over {wall:.1f} s = {total / wall / one_user:.2f}x one user alone; "
              f"time to first token p50 {pct(ttft, 0.5):.2f} s, p95 {pct(ttft, 0.95):.2f} s; "
              f"{same}/{args.users} answers identical to solo; {len(errors)} errors {errors[:3]}")
        # 3. faults
        cancelled = 0
        for i in range(4):
            c = client()
            job = c.submit(*request(prompts[i], 200, 100 + i), api_name="/generate")
            deadline = time.time() + 60
            while not any(text_of(u[1]) for u in job.outputs()) and time.time() < deadline:
                time.sleep(0.02)
            job.cancel()
            cancelled += 1
        disconnected = 0
        for i in range(4):  # a client that goes away mid-stream without cancelling
            c = client()
            job = c.submit(*request(prompts[i], 200, 200 + i), api_name="/generate")
            time.sleep(1.0)
            c.close() if hasattr(c, "close") else None
            del c, job
            disconnected += 1
        malformed = [request("x" * 5000, 8, 0), request("hi", 8, 2 ** 80), request("hi", 10 ** 6, 0),
                     request("hi", 8, -5), ("no-such-profile", "hi", False, 0.7, 0.9, 8, 0, False, 0, 0, 0, 0),
                     request("hi", 8, 0, weights=("lots", 1.0)), request("   ", 8, 0)]
        refused, crashed = 0, []
        for bad in malformed * 3:
            try:
                out = client().predict(*bad, api_name="/generate")
                refused += "Cannot generate" in out[6] or "not offered" in out[6]
            except Exception as e:  # noqa: BLE001
                crashed.append(repr(e)[:120])
        after = {}
        run_user(client, prompts[0], args.tokens, 0, after)
        print(f"\n3. faults: {cancelled} cancelled and {disconnected} dropped mid-stream; "
              f"{refused}/{len(malformed) * 3} malformed requests refused with a message, {len(crashed)} raised "
              f"{crashed[:2]}; afterwards user 0's answer identical to solo: {after.get('answer') == solo[0]['answer']}")
        # 4. memory
        if pid:
            marks = {}
            done = 0
            lock = threading.Lock()

            def short(i):
                nonlocal done
                out = {}
                run_user(client, f"Name a colour, please ({i}).", 8, i, out)
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
