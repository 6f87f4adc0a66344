"""benchmarks.fleet.private: which coordinates a node alone kept, and the global update without them."""

import torch

from benchmarks.fleet.private import private, private_count, without_private
from coordinator.aggregation import GlobalLora


def test_private_coordinates_are_those_no_other_node_kept_and_only_they_are_zeroed():
    kept = {"a": {"q": (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]))},
            "b": {"q": (torch.tensor([0, 1]), torch.tensor([0, 2]))},
            "c": {"q": (torch.tensor([1, 2]), torch.tensor([0, 2]))}}
    assert private("a", kept, "q") == ([3], [1]) and private("b", kept, "q") == ([], [])
    assert private_count("a", kept) == 2
    g = GlobalLora()
    g.load_tensors({"delta.q": torch.ones(5, 3)})
    z = without_private(g, "a", kept).delta["q"]
    assert z[3].abs().sum() == 0 and z[:, 1].abs().sum() == 0
    assert int((z == 1).sum()) == 15 - 3 - 5 + 1  # row 3 and col 1 zeroed, nothing else
    assert torch.equal(g.delta["q"], torch.ones(5, 3))  # the original is untouched
