"""Votes: stored safely from many sessions at once, refused when malformed or repeated, and
exported as pairs that the training reader reads back."""
import threading

import pytest

from genarm_core.cli import main
from genarm_core.data import read_pairs
from genarm_core.votes import Vote, VoteError, VoteStore


def vote(i=0, **kw):
    base = dict(session=f"s{i % 4}", profile="tiny", objective="helpfulness", verdict="A",
                prompt=f"Question {i}?", answer_a=f"A long useful answer {i}.", answer_b=f"No. {i}",
                weights_a={"help": 1.0}, weights_b={}, seed=i, options={"temperature": 0.7})
    return Vote(**{**base, **kw})


def test_four_clients_voting_at_once_store_every_vote(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    errors = []

    def client(c):
        mine = VoteStore(tmp_path / "votes.sqlite")  # each client its own store object, as processes would
        for k in range(25):
            try:
                mine.add(vote(c * 100 + k, session=f"client{c}",
                              verdict=["A", "B", "tie", "both_bad"][k % 4],
                              objective=["helpfulness", "harmlessness"][k % 2]))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rows = store.rows()
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100
    assert {r["session"] for r in rows} == {f"client{c}" for c in range(4)}


def test_export_is_read_back_by_the_training_reader(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    store.add(vote(1, verdict="A"))
    store.add(vote(2, verdict="B"))
    store.add(vote(3, verdict="tie"))
    store.add(vote(4, verdict="both_bad"))
    store.add(vote(5, verdict="A", objective="harmlessness"))
    result = store.export("helpfulness", tmp_path / "pairs.jsonl")
    assert result == {"votes": 4, "pairs": 2, "undecided": 2, "path": str(tmp_path / "pairs.jsonl")}
    pairs, layout = read_pairs(tmp_path / "pairs.jsonl", "auto", None)
    assert layout == "jsonl" and len(pairs) == 2
    assert (pairs[0].chosen, pairs[0].rejected) == ("A long useful answer 1.", "No. 1")
    assert (pairs[1].chosen, pairs[1].rejected) == ("No. 2", "A long useful answer 2.")  # B won


@pytest.mark.parametrize("bad,message", [
    (dict(verdict="C"), "verdict: expected one of A, B, tie, both_bad"),
    (dict(objective="honesty"), "objective: expected one of helpfulness, harmlessness"),
    (dict(prompt="  "), "prompt: expected non-empty text"),
    (dict(answer_b="A long useful answer 0."), "nothing to compare"),
    (dict(weights_a={"help": "high"}), "weights_a: expected a mapping"),
    (dict(answer_a="x" * 30000), "answer_a: 30000 characters"),
])
def test_malformed_votes_are_refused_with_the_reason(bad, message):
    with pytest.raises(VoteError, match=message):
        vote(**bad)


def test_a_duplicate_vote_is_refused_and_stores_nothing(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    store.add(vote(1))
    with pytest.raises(VoteError, match="already recorded"):
        store.add(vote(1, verdict="B"))
    assert len(store.rows()) == 1
    store.add(vote(1, objective="harmlessness"))  # the other objective is another vote
    assert len(store.rows()) == 2


def test_votes_cli_counts_and_exports(tmp_path, capsys):
    db = tmp_path / "v.sqlite"
    store = VoteStore(db)
    for i in range(3):
        store.add(vote(i, verdict="AB"[i % 2]))
    assert main(["votes", "--db", str(db), "count"]) == 0
    assert "3 votes" in capsys.readouterr().out
    out = tmp_path / "p.jsonl"
    assert main(["votes", "--db", str(db), "export", "--objective", "helpfulness", "--out", str(out)]) == 0
    assert "3 pairs" in capsys.readouterr().out and len(out.read_text().splitlines()) == 3
