import json

import pytest
import yaml

from conftest import profile_dict
from genarm_core.cli import main


@pytest.fixture(scope="module")
def config_file(tiny, arms_spec, tmp_path_factory):
    f = tmp_path_factory.mktemp("cli") / "models.yaml"
    f.write_text(yaml.safe_dump(profile_dict(tiny["root"] / "base", arms_spec)))
    return str(f)


def test_generate_json_prints_text_ids_and_logprobs(config_file, capsys, tmp_path, engine):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n\n{"prompt": "Tell me a story"}\n')
    code = main(["--config", config_file, "generate", "--prompts", str(prompts), "--weight", "help=1.5",
                 "--weight", "small=-0.5", "--temperature", "0", "--max-new-tokens", "5", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hi there", "Tell me a story"]
    from genarm_core import SamplingOptions
    expected = engine.generate("Hi there", {"help": 1.5, "small": -0.5}, SamplingOptions(temperature=0, max_new_tokens=5))
    assert rows[0]["token_ids"] == expected.token_ids and rows[0]["text"] == expected.text
    assert set(rows[0]["logprobs_arms"]) == {"help", "harm", "small"}
    assert len(rows[0]["logprobs_fused"]) == len(rows[0]["logprobs_base"]) == 5


def test_score_prints_rewards(config_file, capsys):
    assert main(["--config", config_file, "score", "--prompt", "Hi", "--response", "Hello!", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row["rewards"]) == {"help", "harm", "small"} and all(v < 0 for v in row["rewards"].values())


@pytest.mark.parametrize("args,message", [
    (["--weight", "nope=1"], "unknown ARM"),
    (["--weight", "help=nan"], "finite"),
    (["--weight", "help=9"], "outside its range"),
    (["--weight", "help"], "expected NAME=VALUE"),
    (["--prompt", "  "], "prompt is empty"),
    (["--prompt", "word " * 400], "exceeds the model's context"),
])
def test_bad_input_exits_non_zero_with_a_clear_error(config_file, capsys, args, message):
    if "--prompt" not in args:
        args = ["--prompt", "hello", *args]
    assert main(["--config", config_file, "generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_malformed_models_file_exits_non_zero(tmp_path, capsys):
    f = tmp_path / "m.yaml"
    f.write_text("profiles: {a: {base: {hub: x, path: y}}}")
    assert main(["--config", str(f), "profiles"]) == 2
    assert "exactly one of" in capsys.readouterr().err
