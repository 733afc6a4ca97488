import json

import pytest

from genarm_core.errors import GenarmError
from genarm_core.data import (DataError, EncodedPair, PreferencePair, collate, encode_pairs, length_batches,
                              read_pairs)
from genarm_core.prompts import prompt_ids, response_ids


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


HH = ("\n\nHuman: What is tea?\n\nAssistant: A drink made from leaves."
      "\n\nHuman: Is it hot?\n\nAssistant: {}")


def test_jsonl_layout(tmp_path):
    f = write(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        "",
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
         "chosen": "Hi.", "rejected": "..."},
    ])
    pairs, layout = read_pairs(f)
    assert layout == "jsonl"
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Hi?", "Hello!", "Go away."),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], "Hi.", "...")]
    assert pairs[1].where == f"{f}:3"
    assert pairs[0].chosen_complete and pairs[0].rejected_complete  # the default


def test_jsonl_completeness_flags_are_read(tmp_path):
    f = write(tmp_path / "p.jsonl", [{"prompt": "Hi?", "chosen": "Hello, and", "rejected": "No.",
                                      "chosen_complete": False, "rejected_complete": True}])
    (pair,), _ = read_pairs(f)
    assert (pair.chosen_complete, pair.rejected_complete) == (False, True)


def test_hh_layout_splits_conversation_and_final_replies(tmp_path):
    f = write(tmp_path / "hh.jsonl", [{"chosen": HH.format("Usually, yes."), "rejected": HH.format("No idea.")},
                                      {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Bye"}])
    pairs, layout = read_pairs(f)
    assert layout == "hh"
    assert pairs[0].prompt == [{"role": "user", "content": "What is tea?"},
                               {"role": "assistant", "content": "A drink made from leaves."},
                               {"role": "user", "content": "Is it hot?"}]
    assert (pairs[0].chosen, pairs[0].rejected) == ("Usually, yes.", "No idea.")
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ([{"role": "user", "content": "Hi"}], "Hello", "Bye")


def test_pku_layout_label_picks_the_chosen_response(tmp_path):
    rec = {"prompt": "How do I pick a lock?", "response_0": "Here is how...", "response_1": "I can't help.",
           "better_response_id": 0, "safer_response_id": 1}
    f = write(tmp_path / "pku.jsonl", [rec])
    helpful, layout = read_pairs(f, "auto", "helpfulness")
    harmless, _ = read_pairs(f, "pku", "harmlessness")
    assert layout == "pku"
    assert (helpful[0].chosen, helpful[0].rejected) == ("Here is how...", "I can't help.")
    assert (harmless[0].chosen, harmless[0].rejected) == ("I can't help.", "Here is how...")
    with pytest.raises(DataError, match="label"):
        read_pairs(f, "pku", None)


GOOD_JSONL = {"prompt": "Hi?", "chosen": "a", "rejected": "b"}
GOOD_PKU = {"prompt": "Hi?", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}


@pytest.mark.parametrize("layout,record,field", [
    ("jsonl", "{not json", "not valid JSON"),
    ("jsonl", [1, 2], "expected a JSON object"),
    ("jsonl", {"chosen": "a", "rejected": "b"}, "'prompt'"),
    ("jsonl", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt'"),
    ("jsonl", {"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt'"),
    ("jsonl", {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'prompt[0]'.content"),
    ("jsonl", {"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "'prompt[0]'.role"),
    ("jsonl", {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "'prompt'"),
    ("jsonl", {"prompt": "Hi?", "rejected": "b"}, "'chosen'"),
    ("jsonl", {"prompt": "Hi?", "chosen": "a", "rejected": None}, "'rejected'"),
    ("jsonl", {**GOOD_JSONL, "chosen_complete": "no"}, "'chosen_complete': expected true or false"),
    ("jsonl", {**GOOD_JSONL, "rejected_complete": 0}, "'rejected_complete': expected true or false"),
    ("hh", {"chosen": "no turns here", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "'chosen'"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a"}, "'rejected'"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"},
     "'chosen' and 'rejected'"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "'chosen'"),
    ("pku", {**GOOD_PKU, "response_1": 5}, "'response_1'"),
    ("pku", {**GOOD_PKU, "better_response_id": 2}, "'better_response_id'"),
    ("pku", {k: v for k, v in GOOD_PKU.items() if k != "better_response_id"}, "'better_response_id'"),
    ("pku", {**GOOD_PKU, "prompt": ""}, "'prompt'"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, layout, record, field):
    good = GOOD_PKU if layout == "pku" else GOOD_JSONL if layout == "jsonl" else {
        "chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    f = write(tmp_path / "bad.jsonl", [good, "", record])
    with pytest.raises(DataError) as e:
        read_pairs(f, layout, "helpfulness")
    assert f"{f}:3:" in str(e.value) and field in str(e.value)
    assert isinstance(e.value, GenarmError)  # the CLI prints "error: ..." and exits 2


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no records"):
        read_pairs(write(tmp_path / "empty.jsonl", [""]))


def test_encode_uses_the_engine_prompt_code_and_ends_responses_with_eos(tokenizer):
    pairs = [PreferencePair("Tell me about tea.", "Hot.", "Cold."),
             PreferencePair([{"role": "user", "content": "Hi"}], "Hello", "Bye")]
    encoded, stats = encode_pairs(pairs, tokenizer, eos_id=2, system_prompt="Be nice.")
    for p, e in zip(pairs, encoded):
        assert e.prompt == prompt_ids(tokenizer, p.prompt, True, "Be nice.")
        assert e.chosen == response_ids(tokenizer, p.chosen, 2) and e.chosen[-1] == 2
        assert e.rejected == response_ids(tokenizer, p.rejected, 2)
    assert stats.pairs == 2 and stats.skipped_too_long == 0


def test_a_response_cut_off_by_a_token_limit_gets_no_eos(tokenizer):
    pair = PreferencePair("Tell me about tea.", "Tea is a drink made by", "No.", chosen_complete=False)
    (e,), _ = encode_pairs([pair], tokenizer, eos_id=2)
    assert e.chosen == response_ids(tokenizer, pair.chosen, None) and e.chosen[-1] != 2
    assert e.rejected[-1] == 2


def test_overlong_pairs_skipped_or_truncated_and_counted(tokenizer):
    long = " ".join(["word"] * 40)
    pairs = [PreferencePair("Hi", "short", "brief"), PreferencePair("Hi", long, "also " + long),
             PreferencePair("Hi", "same", "same")]
    n_prompt = len(prompt_ids(tokenizer, "Hi", False))
    limit = n_prompt + 10
    kept, stats = encode_pairs(pairs, tokenizer, 2, limit, "skip", chat_template=False)
    assert len(kept) == 1 and stats.skipped_too_long == 1 and stats.skipped_identical == 1
    kept, stats = encode_pairs(pairs, tokenizer, 2, limit, "truncate", chat_template=False)
    assert len(kept) == 2 and stats.truncated == 1 and stats.skipped_too_long == 0
    assert kept[1].length == limit and kept[1].prompt == prompt_ids(tokenizer, "Hi", False)


def test_length_batches_group_similar_lengths_and_follow_the_seed():
    pairs = [EncodedPair([1] * n, [5, 2], [6, 7, 2]) for n in [9, 1, 5, 3, 7, 2, 8, 4, 6, 10]]
    batches = length_batches(pairs, 3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(10))
    for b in batches:  # sorted by length, so each batch spans a narrow range
        lengths = sorted(pairs[i].length for i in b)
        assert lengths[-1] - lengths[0] <= 2
    assert batches == length_batches(pairs, 3, seed=0)
    assert any(length_batches(pairs, 3, seed=s) != batches for s in range(1, 5))


def test_collate_puts_chosen_then_rejected_rows_with_masks():
    pairs = [EncodedPair([1, 2], [3, 9], [4, 4, 9]), EncodedPair([1], [5, 9], [6, 9])]
    b = collate(pairs, pad_id=0)
    assert b.pairs == 2
    assert b.input_ids.tolist() == [[1, 2, 3, 9, 0], [1, 5, 9, 0, 0], [1, 2, 4, 4, 9], [1, 6, 9, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b.response_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
