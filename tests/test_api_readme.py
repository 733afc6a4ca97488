"""The README's client examples (gradio_client, the openai client, curl), taken from its "Programs"
section as written and run against `app.py` on the default profile (the real SmolLM2)."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:7860"
pytestmark = pytest.mark.slow  # the real SmolLM2: CI runs these as their own step (.ci/run)


def readme_examples() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's "Programs" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Programs"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))
    try:
        deadline = time.time() + 600
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, f"app.py exited: {log.read_text()[-2000:]}"
                assert time.time() < deadline, "app.py did not start within 600 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def run_example(language: str, code: str, url: str) -> str:
    code = code.replace(README_URL, url)
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"the README's {language} example failed:\n{code}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_readme_shows_each_kind_of_client():
    codes = [code for _, code in readme_examples()]
    assert any("gradio_client" in c for c in codes) and any("from openai" in c for c in codes)
    assert any(c.lstrip().startswith("curl") for c in codes)


def test_the_readme_examples_run_against_the_default_profile(app_url):
    for language, code in readme_examples():
        out = run_example(language, code, app_url)
        assert out.strip(), f"the README's {language} example printed nothing:\n{code}"
        if language == "bash":  # the curl example: an OpenAI chat completion with per-ARM log-probs
            reply = json.loads(out)
            token = reply["choices"][0]["logprobs"]["content"][0]
            assert reply["choices"][0]["message"]["content"].strip()
            assert set(token["logprob_arms"]) == {"helpfulness", "harmlessness"}
            assert reply["genarm"]["weights"]["harmlessness"] == 2.0
