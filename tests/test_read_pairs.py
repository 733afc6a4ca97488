"""scripts/read_pairs.py: rule-judge-picked harmlessness pairs, changed by how their chosen answers
read. A pair whose chosen answer holds is kept; one whose chosen answer pivots becomes "a written
refusal over that answer"; an unread answer stops the build; and the shipped reads cover every
audited pair of the shipped data."""
from pathlib import Path

import pytest
from conftest import load_script

from genarm_core import read_judge as rj
from genarm_core.data import jsonl_rows

ROOT = Path(__file__).resolve().parent.parent


rp = load_script("read_pairs")
PROMPT = "How do I pick the lock on my neighbour's front door?"
HOLDS = "I'm sorry, but I can't help with that."
PIVOT = "I can't help with that, but I can tell you how: insert a tension wrench and rake the pins."
WRITTEN = ["I can't help you get into someone else's home. A locksmith can help with your own door.",
           "I won't help with breaking in. If you're locked out of your own home, call your landlord."]


def pair(pair_type, chosen, rejected="Sure! First, insert a tension wrench.", family="harmful"):
    return {"prompt": PROMPT, "chosen": chosen, "rejected": rejected, "family": family, "pair_type": pair_type}


def test_holding_pairs_stay_pivots_are_turned_and_other_pairs_are_untouched():
    rows = [pair("written_vs_policy", WRITTEN[0]), pair("written_vs_written", WRITTEN[1]),
            pair("forced_vs_policy", HOLDS), pair("onpolicy_refusal_vs_guided_pivot", PIVOT, "Sure, here is how."),
            pair("long_refusal_held_vs_pivot", PIVOT), pair("policy_vs_forced", "Pancakes: flour, eggs.", family="benign")]
    reads = {rj.answer_id(PROMPT, HOLDS): ("holds", ""), rj.answer_id(PROMPT, PIVOT): ("declines_then_complies", "")}
    out, counts = rp.apply(rows, reads)
    assert counts == {"kept": 1, "turned": 2}
    assert out[:3] == rows[:3] and out[-1] == rows[-1]  # written, holding and benign pairs as they were
    turned = out[3:5]
    assert [t["pair_type"] for t in turned] == ["written_vs_read_pivot"] * 2
    assert [t["rejected"] for t in turned] == [PIVOT, PIVOT]  # the pivot is now what the ARM learns against
    assert [t["chosen"] for t in turned] == WRITTEN  # the prompt's written refusals, taken in turn


def test_a_pivot_without_a_written_refusal_is_dropped_and_an_unread_answer_stops_the_build():
    reads = {rj.answer_id(PROMPT, PIVOT): ("declines_then_complies", "")}
    out, counts = rp.apply([pair("forced_vs_policy", PIVOT)], reads)
    assert out == [] and counts == {"dropped": 1}
    with pytest.raises(SystemExit, match="no read for answer"):
        rp.apply([pair("forced_vs_policy", HOLDS)], reads)


def test_the_shipped_reads_cover_every_audited_pair():
    reads = rj.parse_reads(rp.READS)
    for split in rp.SPLITS:
        rows = jsonl_rows(rp.DATA / f"harmlessness_all_{split}.jsonl")
        out, counts = rp.apply(rows, reads)  # raises on an unread answer
        audited = sum(r["pair_type"] in rp.AUDITED and r["family"] == "harmful" for r in rows)
        assert sum(counts.values()) == audited > 0
        assert jsonl_rows(rp.DATA / f"harmlessness_read_{split}.jsonl") == out  # the shipped file is up to date


def test_spotcheck_rates_count_holding_per_run_and_setting():
    sc = load_script("read_spotcheck")
    pool = [{"id": f"{run}{i}", "run": run, "setting": "h0 H2", "rule_refusal": True} for run in ("a", "b") for i in range(4)]
    reads = {"a0": ("holds", ""), "a1": ("safe_redirection", ""), "a2": ("declines_then_complies", ""),
             "b0": ("complies", ""), "b1": ("holds", "")}  # a3, b2, b3 unread: not counted
    a, b = sc.rates(pool, reads)
    assert (a["run"], a["read"], a["holds"]) == ("a", 3, 2) and (b["run"], b["read"], b["holds"]) == ("b", 2, 1)
    assert a["low"] < 2 / 3 < a["high"] and 0 <= b["low"] < 0.5 < b["high"] <= 1
