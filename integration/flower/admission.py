"""Which replies a round admits: the reference modules and heads, and the frozen factor.

Pure checks on decoded replies (:class:`~integration.flower.messages._Reply`); each returns
the admitted replies and, per rejected node, the reason. :class:`LoRAStrategy` logs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from glora_math import LoRAFactors

from .messages import _clip, _majority, _Reply


def check_reference(
    decoded: Mapping[int, _Reply],
    modules: Mapping[str, tuple[int, int]] | None,
    dense_reference: Mapping[str, tuple[int, ...]] | None,
) -> tuple[list[_Reply], dict[int, str]]:
    """The replies whose modules, shapes and heads match the reference, by node id.

    The reference is ``modules`` / ``dense_reference`` where the server has them, else what a
    strict majority of the replies hold (none: every reply is rejected, saying so).
    """
    if not decoded:
        return [], {}
    mods_of = {
        n: tuple(sorted((m, r.adapter.modules[m].factors.shape) for m in r.adapter.modules))
        for n, r in decoded.items()
    }
    dense_of = {
        n: tuple(sorted((k, tuple(v.shape)) for k, v in r.adapter.dense.items()))
        for n, r in decoded.items()
    }
    want_mods = tuple(sorted(modules.items())) if modules is not None else _majority(mods_of)
    want_dense = (
        tuple(sorted(dense_reference.items())) if dense_reference is not None
        else _majority(dense_of)
    )  # fmt: skip
    ok, rejected = [], {}
    for node in sorted(decoded):
        if want_mods is None or want_dense is None:
            rejected[node] = ("replies disagree on their modules and none holds a majority; "
                              "pass modules= to LoRAStrategy")  # fmt: skip
        elif mods_of[node] != want_mods:
            want, have = dict(want_mods), dict(mods_of[node])
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            wrong = sorted(n for n in set(want) & set(have) if want[n] != have[n])
            rejected[node] = _clip(
                f"module mismatch: missing {missing[:3]}, extra {extra[:3]}, "
                f"wrong shape {[(n, have[n], want[n]) for n in wrong[:3]]}"
            )
        elif dense_of[node] != want_dense:
            rejected[node] = _clip(
                f"modules_to_save tensors {[k for k, _ in dense_of[node]][:3]} differ from "
                f"the reference {[k for k, _ in want_dense][:3]} (names or shapes)"
            )
        else:
            ok.append(decoded[node])
    return ok, rejected


def frozen_reference(
    which: Literal["A", "B"],
    names: Sequence[str],
    own: Mapping[str, LoRAFactors],
    shared_a: Mapping[str, Tensor] | None,
) -> dict[str, Tensor] | None:
    """The frozen factor every reply must carry, or ``None``: a strict majority's.

    For A, the server's own A once it has a global update, else ``shared_a``; ``None`` (and
    always for B, which carries the scale) means the one a strict majority of the round's
    replies holds.
    """
    if which == "A" and own and set(names) <= set(own):
        return {n: own[n].A.to(torch.float32) for n in names}
    if which == "A" and shared_a is not None:
        return dict(shared_a)
    return None


def check_frozen(
    replies: list[_Reply],
    which: Literal["A", "B"],
    reference: Mapping[str, Tensor] | None,
    operator: str,
) -> tuple[list[_Reply], dict[int, str]]:
    """Keep the replies whose frozen factor (``which``) is the shared one, in every module.

    Against ``reference`` (:func:`frozen_reference`) or, if it is ``None``, the factor held by a
    strict majority of the replies. Compared in float32, the precision the clients received it
    in.
    """

    def part(r: _Reply, name: str) -> Tensor:
        f = r.adapter.modules[name].factors
        return (f.A if which == "A" else f.B).to(torch.float32)

    names = sorted(replies[0].adapter.modules)
    majority = None
    if reference is None:
        majority = _majority(
            {r.node: tuple(part(r, n).numpy().tobytes() for n in names) for r in replies}
        )
    ok, rejected = [], {}
    for r in replies:
        if reference is not None:
            good = all(
                n in reference
                and part(r, n).shape[0] <= reference[n].shape[0]
                and torch.equal(part(r, n), reference[n][: part(r, n).shape[0]])
                for n in names
            )
        else:
            good = majority is not None and majority == tuple(
                part(r, n).numpy().tobytes() for n in names
            )
        if good:
            ok.append(r)
        else:
            rejected[r.node] = (
                f"{which} differs from the frozen, shared {which} of this round ({operator})"
            )
    return ok, rejected


__all__ = ["check_frozen", "check_reference", "frozen_reference"]
