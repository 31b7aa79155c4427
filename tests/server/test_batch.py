"""build_step's packs: a step whose rows use the same packs as the last one reuses its StepPacks
(what the linears kept for it); any change builds them anew."""
from __future__ import annotations

import torch

from skillpack_server.model.batch import SeqChunk, build_step


def step(packs_per_seq, previous=None):
    chunks = [SeqChunk([5], 3, [i], [0], packs) for i, packs in enumerate(packs_per_seq)]
    return build_step(chunks, 4, 3, "cpu", previous).packs


def test_unchanged_rows_reuse_the_last_steps_packs_and_a_change_rebuilds_them():
    first = step([[(0, 1.0)], [(2, 0.5)]])
    assert step([[(0, 1.0)], [(2, 0.5)]], first) is first
    swapped = step([[(2, 0.5)], [(0, 1.0)]], first)
    assert swapped is not first
    assert torch.equal(swapped.mix, torch.tensor([[0.0, 0.0, 0.5], [1.0, 0.0, 0.0]]))
    reweighted = step([[(0, 1.0)], [(2, 0.25)]], first)
    assert reweighted is not first and reweighted.mix[1, 2] == 0.25
    assert step([[], []], first) is None  # base rows only: no packs at all
    grown = step([[(0, 1.0)], [(2, 0.5)], []], first)  # a row joined
    assert grown is not first and grown.mix.shape == (3, 3)
