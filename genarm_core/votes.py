"""Visitors' votes on pairs of answers, kept in SQLite, exported as preference pairs.

Each vote says, for one objective (helpfulness or harmlessness), which of two answers to one
prompt is better: "A", "B", "tie" or "both_bad" (as in the LMSYS arena). `export` turns the
decided ones (A or B) into the generic JSONL layout that `train` reads, so that a deployment's
visitors train its next ARMs. The database runs in WAL mode with one connection per call, safe
for many sessions and processes at once.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GenarmError

OBJECTIVES = ("helpfulness", "harmlessness")
VERDICTS = ("A", "B", "tie", "both_bad")
MAX_TEXT = 20_000  # characters of a prompt or an answer

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    session TEXT NOT NULL,
    profile TEXT NOT NULL,
    objective TEXT NOT NULL CHECK (objective IN ('helpfulness', 'harmlessness')),
    verdict TEXT NOT NULL CHECK (verdict IN ('A', 'B', 'tie', 'both_bad')),
    prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    weights_a TEXT NOT NULL,
    weights_b TEXT NOT NULL,
    seed INTEGER NOT NULL,
    options TEXT NOT NULL,
    UNIQUE (session, objective, prompt, answer_a, answer_b)
);
"""


class VoteError(GenarmError, ValueError):
    """A malformed or duplicate vote."""


@dataclass(frozen=True)
class Vote:
    session: str
    profile: str
    objective: str
    verdict: str
    prompt: str
    answer_a: str
    answer_b: str
    weights_a: dict = field(default_factory=dict)
    weights_b: dict = field(default_factory=dict)
    seed: int = 0
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise VoteError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.verdict not in VERDICTS:
            raise VoteError(f"verdict: expected one of {', '.join(VERDICTS)}, got {self.verdict!r}")
        for name in ("session", "profile", "prompt", "answer_a", "answer_b"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise VoteError(f"{name}: expected non-empty text")
            if len(value) > MAX_TEXT:
                raise VoteError(f"{name}: {len(value)} characters; at most {MAX_TEXT}")
        if self.answer_a == self.answer_b:
            raise VoteError("answer_a and answer_b are the same text: there is nothing to compare")
        for name in ("weights_a", "weights_b"):
            w = getattr(self, name)
            if not isinstance(w, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                  and not isinstance(v, bool) for k, v in w.items()):
                raise VoteError(f"{name}: expected a mapping of ARM name to number")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise VoteError(f"seed: expected an integer, got {self.seed!r}")


def default_path() -> Path:
    from .paths import cache_dir

    return Path(os.environ.get("GENARM_VOTES", cache_dir() / "votes.sqlite"))


class VoteStore:
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path or default_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def add(self, vote: Vote) -> int:
        """Stores a vote; a duplicate (same session, objective, prompt and answers) is refused."""
        row = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), vote.session, vote.profile, vote.objective,
               vote.verdict, vote.prompt, vote.answer_a, vote.answer_b, json.dumps(vote.weights_a),
               json.dumps(vote.weights_b), vote.seed, json.dumps(vote.options))
        db = self._connect()
        try:
            with db:
                cur = db.execute("INSERT INTO votes (created, session, profile, objective, verdict, prompt, answer_a, "
                                 "answer_b, weights_a, weights_b, seed, options) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row)
                return cur.lastrowid
        except sqlite3.IntegrityError:
            raise VoteError(f"this {vote.objective} vote on these two answers was already recorded") from None
        finally:
            db.close()

    def rows(self, objective: str | None = None) -> list[dict]:
        db = self._connect()
        db.row_factory = sqlite3.Row
        try:
            query = "SELECT * FROM votes" + (" WHERE objective = ?" if objective else "") + " ORDER BY id"
            return [dict(r) for r in db.execute(query, (objective,) if objective else ())]
        finally:
            db.close()

    def export(self, objective: str, out: Path | str) -> dict:
        """Writes the decided votes (A or B) on `objective` as preference pairs (JSONL: prompt,
        chosen, rejected); returns counts."""
        if objective not in OBJECTIVES:
            raise VoteError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
        rows = self.rows(objective)
        pairs = []
        for r in rows:
            if r["verdict"] not in ("A", "B"):
                continue
            a_wins = r["verdict"] == "A"
            pairs.append({"prompt": r["prompt"], "chosen": r["answer_a"] if a_wins else r["answer_b"],
                          "rejected": r["answer_b"] if a_wins else r["answer_a"], "source": f"vote {r['id']}",
                          "profile": r["profile"], "objective": objective})
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        return {"votes": len(rows), "pairs": len(pairs), "undecided": len(rows) - len(pairs), "path": str(out)}
