"""The votes pipeline end to end, with the judges standing in for visitors: asks the demo
(launched on loopback, default profile) --prompts everyday training prompts through
gradio_client, votes on each pair of panes for helpfulness as the helpfulness judge would, then
exports the votes and trains an ARM on them for a few steps with the CLI.

    python scripts/simulate_votes.py [--prompts 120] [--steps 10] [--out runs/votes_demo]

Prints each command it runs and the held-out preference accuracy before and after training.
The votes are simulated, so the accuracy says the pipeline works, not that visitors agree.
"""
import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "runs" / "votes_demo"))
    args = ap.parse_args()
    from gradio_client import Client

    from demo.requests import run_inputs
    from genarm_core import SamplingOptions
    from genarm_core.judges import helpfulness_batch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "votes.sqlite"
    db.unlink(missing_ok=True)
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GENARM_VOTES=str(db))
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        rows = [json.loads(line) for line in (ROOT / "space_assets/data/prompts_train.jsonl").read_text().splitlines()]
        prompts = [r["prompt"] for r in rows if r["family"] == "benign"]
        random.Random(0).shuffle(prompts)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for i, prompt in enumerate(prompts[:args.prompts]):
            c = Client(f"http://127.0.0.1:{port}/", verbose=False) if i % 10 == 0 else client
            client = c
            options = SamplingOptions(temperature=0.9, top_p=0.95, max_new_tokens=64, seed=i, no_repeat_ngram_size=3)
            weights = {"helpfulness": random.Random(i).choice([1.0, 2.0, 3.0])}
            final = c.predict(*run_inputs("smollm2-135m", prompt, options, weights, None,
                                          ["helpfulness", "harmlessness"], 2), api_name="/generate")
            left, right = final[7], final[8]
            h = helpfulness_batch([prompt, prompt], [left, right])
            verdict = "Tie" if abs(h[0] - h[1]) < 0.02 else "Left is better" if h[0] > h[1] else "Right is better"
            c.predict(verdict, None, api_name="/vote")
    finally:
        app.terminate()
        app.wait(30)
    pairs = out / "votes_helpfulness.jsonl"
    commands = [
        [sys.executable, "-m", "genarm_core", "votes", "--db", str(db), "count"],
        [sys.executable, "-m", "genarm_core", "votes", "--db", str(db), "export", "--objective", "helpfulness",
         "--out", str(pairs)],
        [sys.executable, "-m", "genarm_core", "train", "--data", str(pairs), "--objective", "helpfulness",
         "--out", str(out / "arm"), "--max-steps", str(args.steps), "--epochs", "10", "--eval-fraction", "0.2",
         "--lora-layers", "20-29", "--length-normalise", "--lr", "1e-3", "--batch-size", "4", "--no-progress"],
    ]
    for cmd in commands:
        print("$ " + " ".join(str(c).replace(str(ROOT) + "/", "") for c in cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    meta = json.loads((out / "arm" / "genarm_arm.json").read_text())
    print(f"held-out preference accuracy: {meta['eval_initial']['accuracy']:.3f} before training, "
          f"{meta['eval']['accuracy']:.3f} after {meta['steps']} steps ({meta['eval']['pairs']} held-out pairs)")


if __name__ == "__main__":
    main()
