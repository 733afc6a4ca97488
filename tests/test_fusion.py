"""The sampler of fusion.py against the reference's independent truncation (a walk down the
sorted list) and Gumbel-max over the whole vocabulary."""
import pytest
import torch

from genarm_core import fusion
from reference import keep_top


def reference_sample(score, temperature, top_k, top_p, u):
    if temperature <= 0:
        return int(score.argmax())
    logits = keep_top(score.double() / temperature, top_k, top_p)
    return int(torch.argmax(logits + fusion.gumbel(u).double()))


@pytest.mark.parametrize("spread", [0.3, 3.0, 12.0])  # flat rows need more than the shortlist
def test_sample_equals_truncate_then_gumbel_max_row_by_row(spread):
    torch.manual_seed(int(spread * 10))
    S, V = 12, 5000
    score = torch.log_softmax(torch.randn(S, V) * spread, -1)
    settings = [(0.0, 0, 1.0), (0.7, 0, 0.9), (1.0, 0, 1.0), (1.3, 50, 1.0), (0.5, 20, 0.8), (2.0, 0, 0.99),
                (0.9, 0, 0.3), (1.0, 4000, 0.95), (0.8, 1, 1.0), (1.0, 0, 0.999), (0.6, 7, 0.5), (1.1, 0, 0.6)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        u = torch.stack([fusion.uniforms(g, V) for _ in range(S)])
        temps, ks, ps = zip(*settings)
        got = fusion.sample(score, list(temps), list(ks), list(ps), u)
        want = [reference_sample(score[i], *settings[i], u[i]) for i in range(S)]
        assert got.tolist() == want


def test_wide_nucleus_falls_back_to_the_whole_row(monkeypatch):
    monkeypatch.setattr(fusion, "NUCLEUS_SHORTLIST", 8)
    torch.manual_seed(0)
    score = torch.log_softmax(torch.randn(3, 300) * 0.1, -1)  # nearly flat: the nucleus is wide
    u = torch.stack([fusion.uniforms(torch.Generator().manual_seed(i), 300) for i in range(3)])
    got = fusion.sample(score, 1.0, 0, 0.9, u)
    assert got.tolist() == [reference_sample(score[i], 1.0, 0, 0.9, u[i]) for i in range(3)]


def test_greedy_without_draws_and_fused_weights():
    base = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]), -1)
    arms = torch.log_softmax(torch.tensor([[[5.0, 0.0, 0.0]], [[0.0, 4.0, 0.0]]]), -1)
    score = fusion.fuse(base, arms, torch.tensor([[1.0], [0.0]]))
    assert fusion.sample(score, 0.0).tolist() == [0, 0]
    normalised = fusion.fuse(base, arms, torch.tensor([[1.0], [2.0]]), normalised=torch.tensor([[True], [False]]))
    assert torch.allclose(normalised[0], (base[0] + arms[0, 0]) / 2) and torch.allclose(normalised[1], base[1] + 2 * arms[1, 0])


def test_ngram_index_bans_what_would_repeat_an_ngram():
    index = fusion.NgramIndex(2, [5, 6, 7, 5])
    assert index.banned() == [6]  # "5 6" was seen: after 5, 6 is banned
    index.push(8)
    assert index.banned() == []
    three = fusion.NgramIndex(3, [1, 2, 3, 1, 2])
    assert three.banned() == [3]
    assert fusion.NgramIndex(1, [4, 4, 9]).banned() == [4, 9]  # n = 1: no token twice


def test_repetition_penalty_follows_the_sign_rule():
    score = torch.tensor([[-2.0, 1.0, -0.5, 3.0]])
    out = fusion.penalise_repeats(score, [[0, 1]], [2.0])
    assert out.tolist() == [[-4.0, 0.5, -0.5, 3.0]] and score.tolist() == [[-2.0, 1.0, -0.5, 3.0]]
