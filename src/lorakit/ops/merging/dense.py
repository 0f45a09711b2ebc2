"""Dense task-tensor combinations (PEFT 0.21.2 ``merge_utils`` definitions): magnitude/random pruning,
sign election, TIES and DARE."""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Sequence


from lorakit.ops.merging.registry import METHODS

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


MAJORITY_SIGN = ("total", "frequency")


def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (PEFT's TIES pruning)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    top = torch.topk(t.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def random_prune(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with probability ``density`` and rescale by 1/density (PEFT's DARE)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(input=t, fill_value=density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """Entries whose sign agrees with the elected sign (``total`` or ``frequency``, PEFT)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def combine_dense(tensors: list[Tensor], weights: Sequence[float], method: str, *, density: float,
                  majority_sign: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """A registered dense method's combination of task tensors (``ties`` / ``dare_linear`` / ``dare_ties``: as
    PEFT 0.21.2 defines them)."""
    spec = METHODS.get(method)
    if spec is None or spec.combine is None:
        raise ValueError(method)
    return spec.combine(tensors, weights, density=density, majority_sign=majority_sign, generator=generator)


def weighted_stack(pruned: list[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """The task tensors stacked on a new first axis, and the weights shaped to broadcast over it."""
    stacked = torch.stack(pruned, dim=0)
    w = torch.tensor(list(weights)).to(stacked.device)
    return stacked, w.view(w.shape + (1,) * (stacked.dim() - 1))


def sign_elected(stacked: Tensor, w: Tensor, majority_sign: str) -> Tensor:
    """PEFT's disjoint merge: the weighted entries agreeing with the elected sign, averaged over their count."""
    mask = majority_sign_mask(stacked, majority_sign)
    weighted = stacked * w
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def dare_pruned(tensors: list[Tensor], density: float, generator: torch.Generator | None) -> list[Tensor]:
    """Every task tensor with DARE's random pruning (keep ``density``, rescale; the generator is required)."""
    if generator is None:
        raise ValueError("DARE needs a generator")
    return [random_prune(t, density, generator) for t in tensors]
