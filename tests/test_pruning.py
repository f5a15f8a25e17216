import torch

from hf_tokenprune.pruning import Slicing, budget, contiguous_positions, pack, select_top
from hf_tokenprune.scorers.uniform import spread_order


def test_budget_rounds_up_and_clamps():
    assert budget(256, 0.25, 1) == 64
    assert budget(10, 0.25, 1) == 3
    assert budget(3, 0.1, 1) == 1
    assert budget(3, 0.1, 5) == 3
    assert budget(0, 0.5, 1) == 0


def test_pack_keeps_order_and_pads_at_the_end():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[False, True, False, True], [True, True, True, False]])
    packed, valid = pack(values, mask)
    assert packed.tolist() == [[2.0, 4.0, 0.0], [5.0, 6.0, 7.0]]
    assert valid.tolist() == [[True, True, False], [True, True, True]]


def test_select_top_per_unit_with_ties_to_the_earlier_token():
    scores = torch.tensor([[0.0, 5.0, 5.0, 1.0, 9.0, 0.0, 0.0, 0.0]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    keep = select_top(scores, valid, [[4, 4]], ratio=0.25, min_tokens=1)
    assert keep.nonzero()[:, 1].tolist() == [1, 4]
    keep = select_top(scores, valid, [[8]], ratio=0.25, min_tokens=1)
    assert keep.nonzero()[:, 1].tolist() == [1, 4]


def test_select_top_never_keeps_padding():
    scores = torch.tensor([[1.0, 2.0, 100.0]])
    valid = torch.tensor([[True, True, False]])
    keep = select_top(scores, valid, [[2]], ratio=1.0, min_tokens=1)
    assert keep.tolist() == [[True, True, False]]


def test_slicing_left_pads_rows_that_keep_fewer_tokens():
    keep = torch.tensor([[True, False, True, True], [False, True, True, True]])
    keep[1, 1] = False
    slicing = Slicing.from_keep(keep)
    assert slicing.length == 3
    assert slicing.slot_valid.tolist() == [[True, True, True], [False, True, True]]
    assert slicing.index[0].tolist() == [0, 2, 3]
    assert slicing.index[1, 1:].tolist() == [2, 3]
    x = torch.arange(8.0).view(2, 4)
    assert slicing.sequence(x)[0].tolist() == [0.0, 2.0, 3.0]
    assert slicing.mask().tolist() == [[1, 1, 1], [0, 1, 1]]
    positions = torch.arange(4).view(1, 1, 4).expand(3, 2, 4)
    assert slicing.positions(positions)[:, 1, 1:].tolist() == [[2, 3]] * 3


def test_contiguous_positions_skip_padding():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert contiguous_positions(mask, rows=1)[0].tolist() == [[0, 0, 1], [0, 1, 2]]


def test_spread_order_is_evenly_spaced_for_any_prefix():
    rank = spread_order(256)
    assert sorted(rank.tolist()) == list(range(256))
    first = torch.nonzero(rank < 64).flatten()
    assert first.tolist() == list(range(0, 256, 4))
    rank = spread_order(100)
    gaps = torch.diff(torch.nonzero(rank < 25).flatten())
    assert gaps.max() <= 8 and gaps.min() >= 2
