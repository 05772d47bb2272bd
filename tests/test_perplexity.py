"""Perplexity: the sliding-window math against a hand computation, and against transformers' loss."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import tiny_model
from lwq.errors import BadInput
from lwq.eval.perplexity import perplexity, window_plan


class Bigram(nn.Module):
    """Logits depend only on the current token, so every scored token's NLL is known in closed form."""

    def __init__(self, vocab: int = 11, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def hand_ppl(model: Bigram, ids: list[int], seqlen: int, stride: int) -> tuple[float, int]:
    """Enumerate the scored token positions by the README's definition, then average their NLL."""
    scored: list[int] = []
    begin = 0
    while begin + seqlen <= len(ids):
        first = 1 if begin == 0 else max(1, seqlen - stride)
        scored += [begin + j for j in range(first, seqlen)]
        begin += stride
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    nll = -sum(float(logp[ids[i - 1], ids[i]]) for i in scored)
    return math.exp(nll / len(scored)), len(scored)


@pytest.mark.parametrize("n,seqlen,stride", [(50, 8, 8), (50, 8, 3), (50, 8, 1), (64, 16, 16), (37, 5, 4), (40, 8, 7)])
def test_sliding_window_matches_hand_computation(n: int, seqlen: int, stride: int) -> None:
    model = Bigram()
    ids = torch.randint(0, 11, (n,), generator=torch.Generator().manual_seed(n + stride))
    res = perplexity(model, ids, seqlen, stride, batch_size=3)
    want, count = hand_ppl(model, ids.tolist(), seqlen, stride)
    assert res.tokens == count
    assert res.perplexity == pytest.approx(want, rel=1e-5)


def test_overlapping_windows_score_each_token_once() -> None:
    # with stride < seqlen every token from position 1 to the end of the last window is scored once
    plan = window_plan(100, 10, 4)
    scored = []
    for w in plan:
        scored += [w.begin + j for j in range(w.first_scored, 10)]
    assert sorted(scored) == list(range(1, plan[-1].begin + 10))


def test_disjoint_windows_match_transformers_loss() -> None:
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 128, (4 * 32 + 5,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, ids, 32, batch_size=2)
    with torch.no_grad():
        losses = [float(model(input_ids=ids[b:b + 32][None], labels=ids[b:b + 32][None]).loss)
                  for b in range(0, 128, 32)]
    assert res.windows == 4 and res.tokens == 4 * 31  # final partial window dropped
    assert res.nll == pytest.approx(sum(losses) / 4, rel=1e-5)


def test_max_windows_and_bad_arguments() -> None:
    assert len(window_plan(1000, 10, 10, max_windows=3)) == 3
    for args in [(5, 10, 10), (100, 1, 1), (100, 10, 0), (100, 10, 11)]:
        with pytest.raises(BadInput):
            window_plan(*args)
    with pytest.raises(BadInput):
        window_plan(100, 10, 10, max_windows=0)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("seqlen,stride,batch", [(16, None, 3), (16, 5, 2), (12, 12, 4)])
def test_block_by_block_perplexity_equals_whole_model(arch, seqlen, stride, batch):
    from lwq.models.blocks import ResidentBlocks
    from lwq.eval.perplexity import perplexity_by_blocks

    model = tiny_model(arch, layers=3)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(1))
    whole = perplexity(model, ids, seqlen, stride, max_windows=9, batch_size=batch)
    steps: list[tuple[int, int]] = []
    blocks = perplexity_by_blocks(model, ids, seqlen, stride, 9, batch, lambda i, n: steps.append((i, n)), "cpu",
                                  ResidentBlocks("cpu"))
    assert (blocks.tokens, blocks.windows, blocks.stride) == (whole.tokens, whole.windows, whole.stride)
    assert blocks.nll == pytest.approx(whole.nll, rel=1e-5)
    assert steps == [(i, 4) for i in range(1, 5)]  # three blocks, then the head
