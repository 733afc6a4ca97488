"""Slider latency: time from a slider release to the first new steered token.

Simulates what the demo does on a release: a stream is running (consumed by another thread, as a
Gradio worker would), then it is cancelled and a new stream with the new weights starts; the time
to its first token event is measured. Then the same through the real Gradio app with
gradio_client (a /generate job running, then a /steer call on the same session).

    .venv/bin/python scripts/bench_slider_latency.py [--profile NAME] [--reps 7] [--fake-arms 2]

When the profile has no ARMs yet (`arms: []`), --fake-arms N adds N untrained LoRA adapters
(r=8, zero-initialised so they change nothing, but cost what trained ones cost) on the base.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from genarm_core import Engine, Pane, SamplingOptions, load_config, load_models  # noqa: E402
from genarm_core.config import ArmSpec  # noqa: E402

PROMPT = "Give me three tips for studying for an exam."


def summary(name: str, times: list[float]) -> str:
    ts = sorted(times)
    p90 = ts[min(len(ts) - 1, round(0.9 * (len(ts) - 1)))]
    return (f"{name:<44} median {statistics.median(ts) * 1000:7.0f} ms   p90 {p90 * 1000:7.0f} ms   "
            f"min {ts[0] * 1000:6.0f} ms   (n={len(ts)})")


def with_fake_arms(profile, n: int, folder: Path):
    import copy

    from peft import LoraConfig, get_peft_model

    base = load_models(replace(profile, arms=())).base_model
    arms = []
    for i in range(n):
        name = f"fake{i + 1}"
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        model.save_pretrained(folder / name)
        arms.append(ArmSpec(name=name, label=name, adapter=str(folder / name), beta=1.0))
    return replace(profile, arms=tuple(arms))


def weights(engine, value: float) -> dict:
    return {n: value for n in engine.arm_names}


def bench_engine(engine, reps: int, warm_tokens: int, options: SamplingOptions, with_base: bool) -> list[float]:
    """with_base: the new stream decodes the base pane too (the app does so when the release
    comes before the base pane finished; otherwise it restarts the steered pane alone)."""
    times = []
    for r in range(reps):
        old = engine.stream(PROMPT, [Pane({}), Pane(weights(engine, 1.0))], options)
        seen = threading.Semaphore(0)

        def consume(stream=old):
            for _ in stream:
                seen.release()

        worker = threading.Thread(target=consume)
        worker.start()
        for _ in range(warm_tokens):
            seen.acquire()
        panes = [Pane({})] * with_base + [Pane(weights(engine, 2.0 + 0.1 * r))]

        def restart():  # in a worker thread, as the app's Gradio worker does
            new = engine.stream(PROMPT, panes, options)
            next(new)
            times.append(time.perf_counter() - t0)
            new.cancel()
            for _ in new:
                pass

        t0 = time.perf_counter()  # the slider is released
        old.cancel()
        thread = threading.Thread(target=restart)
        thread.start()
        thread.join()
        worker.join()
    return times


def bench_gradio(engine, reps: int, warm_tokens: int, options: SamplingOptions) -> list[float]:
    from gradio_client import Client

    from demo import build_demo
    from demo.requests import run_inputs

    demo = build_demo(engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    n = len(engine.arm_names) or 1  # slider pool of this profile
    times = []
    try:
        client = Client(url, verbose=False)

        def inputs(w):
            return run_inputs(engine.profile.name, PROMPT, options, {a: w for a in engine.arm_names}, None,
                              engine.arm_names, n)

        for r in range(reps):
            job = client.submit(*inputs(1.0), api_name="/generate")
            while len(job.outputs()) < warm_tokens:
                time.sleep(0.002)
            t0 = time.perf_counter()  # the slider is released
            steer = client.submit(*inputs(2.0 + 0.1 * r), api_name="/steer")
            while not any("<span" in out[1] for out in steer.outputs()):
                time.sleep(0.002)
            times.append(time.perf_counter() - t0)
            client.predict(api_name="/stop")
            steer.result(timeout=120)
            job.result(timeout=120)
    finally:
        demo.close()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=None, help="models.yaml profile (default: the default profile)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warm-tokens", type=int, default=4, help="tokens the running stream makes before the release")
    ap.add_argument("--fake-arms", type=int, default=2, help="untrained LoRA ARMs to add if the profile has none")
    ap.add_argument("--no-gradio", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    profile = load_config().profile(args.profile)
    options = SamplingOptions(temperature=profile.defaults.temperature, top_p=profile.defaults.top_p,
                              max_new_tokens=128, seed=0)
    engines = [("profile " + profile.name + f" ({len(profile.arms)} ARMs)", lambda: Engine(load_models(profile)))]
    tmp = tempfile.TemporaryDirectory()
    if not profile.arms and args.fake_arms:
        engines.append((f"profile {profile.name} + {args.fake_arms} untrained LoRA ARMs",
                        lambda: Engine(load_models(with_fake_arms(profile, args.fake_arms, Path(tmp.name))))))
    for label, make in engines:
        t = time.perf_counter()
        engine = make()
        print(f"\n{label}: loaded in {time.perf_counter() - t:.1f} s on {engine.models.device}")
        bench_engine(engine, 1, args.warm_tokens, options, True)  # warm-up
        for with_base in (False, True):
            name = "engine: cancel + new stream (" + ("base + steered" if with_base else "steered only") + ")"
            print(summary(name, bench_engine(engine, args.reps, args.warm_tokens, options, with_base)))
        if not args.no_gradio:
            print(summary("gradio app (gradio_client /steer) -> first token",
                          bench_gradio(engine, args.reps, args.warm_tokens, options)))
    tmp.cleanup()


if __name__ == "__main__":
    main()
