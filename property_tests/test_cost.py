"""Cost contracts checked by structure, not by timing.

The package promises that cost grows with the client factors, never with d x k, and that fast
routes (the batched QR of equal-rank clients, the Gram route of the consensus, the single
reduction of the finiteness check) are taken wherever they apply. Timings belong to ``bench/``;
here we record what runs: the size of every tensor an operator creates (through a torch
dispatch mode) and which internal routes are called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import glora_math as gm
from glora_math import consensus as consensus_module
from glora_math import gauge as gauge_module
from glora_math import metrics
from glora_math.operators import get_operator, list_operators
from glora_math.validation import all_finite, validate_clients

from .strategies import conditioned_factors, gaussian_clients

F64 = torch.float64


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by a torch op.

    With ``above``, also the shapes of the tensors of more than ``above`` elements.
    """

    def __init__(self, above: int | None = None) -> None:
        super().__init__()
        self.largest = 0
        self.above = above
        self.large_shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(  # type: ignore[override]
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
                if self.above is not None and o.numel() > self.above:
                    self.large_shapes.add(tuple(o.shape))
        return out


def _largest(fn: Callable[[], object]) -> int:
    with LargestTensor() as rec:
        fn()
    return rec.largest


D, K, RANKS, EQUAL_RANKS = 300, 200, [2, 3, 2], [2, 2, 2]


def test_no_operator_creates_a_tensor_of_size_d_times_k() -> None:
    # The functions beside the registered operators (which the next test covers).
    d, k, ranks = D, K, RANKS
    fs = gaussian_clients(len(ranks), d, ranks, k, generator=torch.Generator().manual_seed(0))
    m = sum(ranks)
    # Stacked factors (d or k by m), their small products (m by m): all far below d * k.
    bound = (d + k) * m
    assert bound < d * k // 10
    state = gm.glora_aggregate(fs, rank=3)
    calls: dict[str, Callable[[], object]] = {
        "glora sketch": lambda: gm.glora_aggregate(fs, rank=3, sketch=gm.Sketch()),
        "readout": lambda: gm.readout(state, 2),
        "mean_update": lambda: metrics.mean_update(fs),
        "fro_norm": lambda: metrics.fro_norm(metrics.mean_update(fs)),
        "fro_distance": lambda: metrics.fro_distance(fs[0], fs[1]),
        "singular_values": lambda: metrics.singular_values(metrics.mean_update(fs)),
        "best_rank_approx": lambda: metrics.best_rank_approx(metrics.mean_update(fs), 2),
        "relative_error": lambda: metrics.relative_error(fs[0], fs),
    }
    for name, fn in calls.items():
        assert _largest(fn) <= bound, name


@pytest.mark.parametrize("name", list_operators())
def test_no_registered_operator_creates_a_tensor_of_size_d_times_k(name: str) -> None:
    # Every registered operator, called as its metadata says: clients of equal ranks where it
    # declares equal_ranks, its protocol's frozen factor shared (op.protocol), its warm state
    # in rounds 1 and 2 where it declares one (RoLoRA freezes A, then B), its default options.
    # Operators that are dense by definition (their declared download includes the d x k
    # residual) may create d x k matrices, and nothing larger or of another shape.
    op = get_operator(name)
    d, k = D, K
    ranks = EQUAL_RANKS if op.equal_ranks else RANKS
    fs = gaussian_clients(len(ranks), d, ranks, k, generator=torch.Generator().manual_seed(0))
    m = sum(ranks)
    # Stacked factors (d or k by m, and the certificate's m + R <= 2m columns), their small
    # products: all far below d * k.
    bound = 2 * (d + k) * m
    assert bound < d * k // 5
    dense = op.communication(d, k, max(ranks)).down >= d * k
    # A previous global adapter, for the warm states (as in the contract suite).
    g = torch.Generator().manual_seed(1)
    reference = conditioned_factors(d, k, ranks[0], cond=2.0, generator=g, dtype=F64)
    for round_index in (1, 2) if op.warm_state is not None else (1,):
        state = None if op.warm_state is None else op.warm_state(reference, round_index)
        clients = op.protocol(fs, round_index)
        with LargestTensor(above=bound) as rec:
            result = op(clients, state=state, options=dict(op.options))
        where = f"{name}, round {round_index}"
        if dense:
            assert rec.large_shapes <= {(d, k)}, (where, rec.large_shapes)
            assert result.residual is not None, where
            assert tuple(result.residual.shape) == (d, k), where
        else:
            assert rec.largest <= bound, (where, rec.largest, rec.large_shapes)
            assert result.residual is None, where


def test_the_finiteness_check_allocates_nothing_of_the_input_size() -> None:
    x = torch.randn(50, 40, dtype=F64)
    assert _largest(lambda: all_finite(x)) == 1  # one sum, one scalar test
    x[3, 4] = float("nan")
    assert _largest(lambda: all_finite(x)) == x.numel()  # the elementwise check decides


def test_equal_rank_clients_share_one_batched_qr(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ranks 2 (alone), 1 (a pair) and 3 = d (a triple): only the lone client is fixed by itself.
    fs = gaussian_clients(6, 3, [2, 1, 1, 3, 3, 3], 5, generator=torch.Generator().manual_seed(1))
    alone: list[int] = []
    real = gauge_module._fix_qr

    def spy(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        alone.append(int(B.shape[1]))
        return real(B, A, dtype)

    monkeypatch.setattr(gauge_module, "_fix_qr", spy)
    fixed = gauge_module.gauge_fix_all(fs, validate_clients(fs), "qr")
    assert alone == [2]
    assert [f.rank for f in fixed] == [2, 1, 1, 3, 3, 3]


def test_the_gram_route_decides_where_it_is_accurate(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = gaussian_clients(3, 40, 3, 10, generator=torch.Generator().manual_seed(2))
    used: list[int] = []
    real = consensus_module.tall_left_svd

    def spy(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        used.append(int(M.shape[-1]))
        return real(M)

    monkeypatch.setattr(consensus_module, "tall_left_svd", spy)
    gm.glora_aggregate(fs, rank=4)  # R well below the union (9): the Gram route is accurate
    assert used == []
    with pytest.warns(gm.RankClampedWarning):
        gm.glora_aggregate(fs, rank=10)  # R above the union: the QR route decides
    assert used == [9]
