"""Adapter kinds and their exact dense deltas.

Every adapter knows its dense ``ΔW`` (fp32, strength 1), how to restrict itself to a row window of
its output and how to swap its output halves — exactly, or by raising :class:`NotExact`.
Conventions (see the reference ``math.md``): LoRA ``(α/r)·B·A`` with a missing α meaning α = r;
LoHa ``(α/r)·(w1a·w1b)⊙(w2a·w2b)``; LoKr ``s·kron(w1, w2)`` with ``s = α/dim`` when a factor is
decomposed, else 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TYPE_CHECKING


from lorakit.lora.transforms import NotExact, swap_halves

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from lorakit.lazy import torch


def _f32(t: Tensor | None) -> Tensor:
    assert t is not None, "a factor this adapter form needs is missing"
    return t.to(torch.float32)




def _plain(up: Tensor, down: Tensor, scale: float, weight_shape: tuple[int, ...]) -> "LoRA":
    """A plain LoRA from fp32 matrices ``up`` (out × r) and ``down`` (r × prod(in dims)) with ``ΔW = scale·up@down``:
    α = scale·r (none when the scale is 1), ``down`` shaped (r, *in dims), ``up`` (out, r[, 1, 1])."""
    r = int(down.shape[0])
    tail = tuple(weight_shape[1:])
    down_t = down.reshape(r, *tail).contiguous()
    up_t = up.reshape(int(up.shape[0]), r, *([1] * (len(tail) - 1))).contiguous()
    return LoRA(alpha=None if scale == 1 else scale * r, down=down_t, up=up_t)


def _face_split(a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """``(a1·b1) ⊙ (a2·b2) = U·V`` with ``U[:, (p, q)] = a1[:, p]·a2[:, q]`` (row-wise Khatri–Rao, out × r1·r2) and
    ``V[(p, q), :] = b1[p, :]·b2[q, :]`` (column-wise Khatri–Rao, r1·r2 × in), exactly."""
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return up, down


def _full_split(w: Tensor) -> tuple[Tensor, Tensor]:
    """A full matrix as an exact product ``P·Q`` with the smaller inner size: ``I·W`` (wide) or ``W·I`` (tall)."""
    rows, cols = w.shape
    if rows <= cols:
        return torch.eye(rows, dtype=w.dtype), w
    return w, torch.eye(cols, dtype=w.dtype)


@dataclass
class Adapter:
    kind: ClassVar[str] = "adapter"
    alpha: float | None

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def dense(self) -> Tensor:
        raise NotImplementedError

    def row_slice(self, start: int, stop: int) -> "Adapter":
        raise NotImplementedError

    def swap_halves(self) -> "Adapter":
        raise NotImplementedError

    def scaled(self, c: float) -> "Adapter":
        """An adapter whose delta is ``c`` times this one's."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """Factor tensors by role name (the suffix vocabulary of :mod:`lorakit.formats.suffixes`)."""
        raise NotImplementedError

    def to_lora(self) -> "LoRA":
        """The same delta as plain LoRA factors (``down`` r × in[×k×k], ``up`` out × r[×1×1], no ``mid``),
        exactly: factor algebra in fp32, no SVD. Raises :class:`NotExact` for kinds without low-rank factors."""
        raise NotExact(f"a {self.kind} module has no low-rank factors")

    @property
    def plain_rank(self) -> int | None:
        """The rank of :meth:`to_lora` (computed from shapes alone), or None when there is none."""
        return None

    def to(self, dtype: torch.dtype) -> "Adapter":
        changes: dict[str, Any] = {k: v.to(dtype) for k, v in self._fields().items()}
        return replace(self, **changes)

    def _fields(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._fields().values())).dtype

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self._fields().values())


@dataclass
class LoRA(Adapter):
    """LoRA / LoCon: ``down`` (r × in[×k×k]), ``up`` (out × r[×1×1]), optional Tucker ``mid``."""

    down: Tensor = field(default=None)  # type: ignore[assignment]
    up: Tensor = field(default=None)  # type: ignore[assignment]
    mid: Tensor | None = None

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "locon" if self.down.dim() > 2 else "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.mid is not None:
            return (self.out_features, int(self.down.shape[1]), *self.mid.shape[2:])
        return (self.out_features, *self.down.shape[1:])

    def dense(self) -> Tensor:
        up, down = _f32(self.up).flatten(1), _f32(self.down).flatten(1)
        if self.mid is not None:
            out = torch.einsum("ijkl,pi,jr->prkl", _f32(self.mid), up, down)
            return out * self.scale
        return (up @ down).reshape(self.weight_shape) * self.scale

    def row_slice(self, start: int, stop: int) -> "LoRA":
        return replace(self, up=self.up[start:stop])

    def swap_halves(self) -> "LoRA":
        return replace(self, up=swap_halves(self.up))

    def scaled(self, c: float) -> "LoRA":
        return replace(self, up=(_f32(self.up) * c).to(self.up.dtype))

    def tensors(self) -> dict[str, Tensor]:
        out = {"down": self.down, "up": self.up}
        if self.mid is not None:
            out["mid"] = self.mid
        return out

    @property
    def plain_rank(self) -> int:
        return int(self.mid.shape[0]) if self.mid is not None else self.rank

    def to_lora(self) -> "LoRA":
        """Itself without a Tucker ``mid``: ``down'[i] = Σ_j mid[i, j]·down[j]`` (a k×k conv down), ``up`` unchanged."""
        if self.mid is None:
            return self
        down = torch.einsum("ij...,jr->ir...", _f32(self.mid), _f32(self.down).flatten(1))
        return _plain(_f32(self.up).flatten(1), down.flatten(1), self.scale, self.weight_shape)


@dataclass
class LoHa(Adapter):
    w1a: Tensor = field(default=None)  # type: ignore[assignment]
    w1b: Tensor = field(default=None)  # type: ignore[assignment]
    w2a: Tensor = field(default=None)  # type: ignore[assignment]
    w2b: Tensor = field(default=None)  # type: ignore[assignment]
    t1: Tensor | None = None
    t2: Tensor | None = None
    shape: tuple[int, ...] | None = None  # target weight shape when it is not (out, in)

    kind: ClassVar[str] = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def out_features(self) -> int:
        return int(self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        if self.t1 is not None:
            return (self.out_features, int(self.w1b.shape[1]), *self.t1.shape[2:])
        return (self.out_features, int(self.w1b.shape[1]))

    def dense(self) -> Tensor:
        if self.t1 is not None:
            s1 = torch.einsum("ij...,jr,ip->pr...", _f32(self.t1), _f32(self.w1b), _f32(self.w1a))
            s2 = torch.einsum("ij...,jr,ip->pr...", _f32(self.t2), _f32(self.w2b), _f32(self.w2a))
            return s1 * s2 * self.scale
        d = (_f32(self.w1a) @ _f32(self.w1b)) * (_f32(self.w2a) @ _f32(self.w2b)) * self.scale
        return d.reshape(self.weight_shape)

    def row_slice(self, start: int, stop: int) -> "LoHa":
        if self.t1 is not None:
            return replace(self, w1a=self.w1a[:, start:stop], w2a=self.w2a[:, start:stop], shape=None)
        shape = (stop - start, *self.weight_shape[1:])
        return replace(self, w1a=self.w1a[start:stop], w2a=self.w2a[start:stop], shape=shape if self.shape else None)

    def swap_halves(self) -> "LoHa":
        if self.t1 is not None:
            raise NotExact("Tucker LoHa")
        return replace(self, w1a=swap_halves(self.w1a), w2a=swap_halves(self.w2a))

    def scaled(self, c: float) -> "LoHa":
        return replace(self, w1a=(_f32(self.w1a) * c).to(self.w1a.dtype))

    def tensors(self) -> dict[str, Tensor]:
        out = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        if self.t1 is not None:
            out["hada_t1"] = self.t1
            out["hada_t2"] = self.t2  # type: ignore[assignment]
        return out

    @property
    def plain_rank(self) -> int:
        return int(self.w1b.shape[0]) * int(self.w2b.shape[0])

    def _hadamard_factors(self, a: Tensor, b: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor]:
        """One Hadamard factor as ``(P, Q)`` with ``P@Q`` its matrix (out × prod(in dims)). Tucker:
        ``Σ_ij t[i,j,…]·a[i,p]·b[j,r] = (aᵀ)·M`` with ``M[i, (r, …)] = Σ_j t[i,j,…]·b[j,r]``."""
        if t is None:
            return _f32(a), _f32(b).flatten(1)
        m = torch.einsum("ij...,jr->ir...", _f32(t), _f32(b))
        return _f32(a).T.contiguous(), m.flatten(1)

    def to_lora(self) -> "LoRA":
        """``(P1·Q1) ⊙ (P2·Q2)`` as rank ``r1·r2`` LoRA factors by the face-splitting product (exact)."""
        p1, q1 = self._hadamard_factors(self.w1a, self.w1b, self.t1)
        p2, q2 = self._hadamard_factors(self.w2a, self.w2b, self.t2)
        up, down = _face_split(p1, p2, q1, q2)
        return _plain(up, down, self.scale, self.weight_shape)

    def _fields(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}


@dataclass
class LoKr(Adapter):
    w1: Tensor | None = None
    w1a: Tensor | None = None
    w1b: Tensor | None = None
    w2: Tensor | None = None
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    t2: Tensor | None = None
    shape: tuple[int, ...] | None = None  # target weight shape when it is not the factors' (a flattened conv)

    kind: ClassVar[str] = "lokr"

    @property
    def dim(self) -> int | None:
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        return None

    @property
    def rank(self) -> int | None:
        return self.dim

    @property
    def scale(self) -> float:
        dim = self.dim
        if dim is None or self.alpha is None:
            return 1.0
        return self.alpha / dim

    def factor1(self) -> Tensor:
        return _f32(self.w1) if self.w1 is not None else _f32(self.w1a) @ _f32(self.w1b)

    def factor2(self) -> Tensor:
        if self.w2 is not None:
            return _f32(self.w2)
        if self.t2 is not None:
            return torch.einsum("ij...,ip,jr->pr...", _f32(self.t2), _f32(self.w2a), _f32(self.w2b)).contiguous()
        return _f32(self.w2a) @ _f32(self.w2b)

    @property
    def _rows1(self) -> int:
        return int((self.w1 if self.w1 is not None else self.w1a).shape[0])  # type: ignore[union-attr]

    @property
    def _rows2(self) -> int:
        if self.w2 is None and self.t2 is not None:
            return int(self.w2a.shape[1])  # type: ignore[union-attr]   # Tucker: lokr_w2_a is (r, out2)
        return int((self.w2 if self.w2 is not None else self.w2a).shape[0])  # type: ignore[union-attr]

    @property
    def out_features(self) -> int:
        return self._rows1 * self._rows2

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        w1 = self.w1 if self.w1 is not None else self.w1b
        in1 = int(w1.shape[1])  # type: ignore[union-attr]
        if self.w2 is not None:
            rest = tuple(self.w2.shape[1:])
        elif self.t2 is not None:
            rest = (int(self.w2b.shape[1]), *self.t2.shape[2:])  # type: ignore[union-attr]
        else:
            rest = (int(self.w2b.shape[1]),)  # type: ignore[union-attr]
        return (self.out_features, in1 * rest[0], *rest[1:])

    def dense(self) -> Tensor:
        w1, w2 = self.factor1(), self.factor2()
        if w2.dim() > 2:
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        out = torch.kron(w1, w2) * self.scale
        return out.reshape(self.shape) if self.shape is not None else out

    def _with_w1_rows(self, rows: slice | Tensor) -> "LoKr":
        if self.w1 is not None:
            return replace(self, w1=self.w1[rows])
        return replace(self, w1a=self.w1a[rows])  # type: ignore[index]

    def row_slice(self, start: int, stop: int) -> "LoKr":
        k = self._rows2
        if start % k or stop % k:
            raise NotExact(f"rows [{start}, {stop}) do not align with LoKr blocks of {k} rows")
        part = self._with_w1_rows(slice(start // k, stop // k))
        return replace(part, shape=(stop - start, *self.shape[1:])) if self.shape is not None else part

    def swap_halves(self) -> "LoKr":
        if self._rows1 % 2:
            raise NotExact("LoKr first factor has an odd number of rows")
        h = self._rows1 // 2
        perm = torch.cat([torch.arange(h, 2 * h), torch.arange(0, h)])
        return self._with_w1_rows(perm)

    def scaled(self, c: float) -> "LoKr":
        if self.w1 is not None:
            return replace(self, w1=(_f32(self.w1) * c).to(self.w1.dtype))
        w1a = self.w1a
        assert w1a is not None      # a LoKr has w1 or (w1a, w1b)
        return replace(self, w1a=(_f32(w1a) * c).to(w1a.dtype))

    def tensors(self) -> dict[str, Tensor]:
        names = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a",
                 "w2b": "lokr_w2_b", "t2": "lokr_t2"}
        return {names[k]: v for k, v in self.__dict__.items() if k in names and v is not None}

    def _kron_factors(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Both Kronecker factors as exact products ``(P, Q)`` of matrices (a conv ``w2`` flattened to
        out2 × prod(in2 dims), which is what ``kron`` of the 4-D tensors does column-wise)."""
        if self.w1 is not None:
            f1 = _full_split(_f32(self.w1).flatten(1))
        else:
            f1 = (_f32(self.w1a), _f32(self.w1b))
        if self.w2 is not None:
            f2 = _full_split(_f32(self.w2).flatten(1))
        elif self.t2 is not None:   # Σ_ij t[i,j,…]·a[i,p]·b[j,r] = aᵀ·M, M[i, (r, …)] = Σ_j t[i,j,…]·b[j,r]
            m = torch.einsum("ij...,jr->ir...", _f32(self.t2), _f32(self.w2b))
            f2 = (_f32(self.w2a).T.contiguous(), m.flatten(1))
        else:
            f2 = (_f32(self.w2a), _f32(self.w2b).flatten(1))
        return f1, f2

    @property
    def plain_rank(self) -> int:
        """inner(w1)·inner(w2): a decomposed factor's rank, or a full factor's smaller side (shapes only)."""
        def inner(full: Tensor | None, b: Tensor | None) -> int:
            if full is not None:
                return min(int(full.shape[0]), math.prod(full.shape[1:]))
            return int(b.shape[0])  # type: ignore[union-attr]
        return inner(self.w1, self.w1b) * inner(self.w2, self.w2b)

    def to_lora(self) -> "LoRA":
        """``kron(P1·Q1, P2·Q2) = kron(P1, P2)·kron(Q1, Q2)`` (mixed product): rank ``r1·r2`` LoRA factors, exactly;
        a full factor counts as ``I·W`` or ``W·I``, whichever has the smaller inner size."""
        (p1, q1), (p2, q2) = self._kron_factors()
        return _plain(torch.kron(p1, p2), torch.kron(q1, q2), self.scale, self.weight_shape)


@dataclass
class Full(Adapter):
    diff: Tensor = field(default=None)  # type: ignore[assignment]

    kind: ClassVar[str] = "full"

    @property
    def out_features(self) -> int:
        return int(self.diff.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def dense(self) -> Tensor:
        return _f32(self.diff)

    def row_slice(self, start: int, stop: int) -> "Full":
        return replace(self, diff=self.diff[start:stop])

    def swap_halves(self) -> "Full":
        return replace(self, diff=swap_halves(self.diff))

    def scaled(self, c: float) -> "Full":
        return replace(self, diff=(_f32(self.diff) * c).to(self.diff.dtype))

    def tensors(self) -> dict[str, Tensor]:
        return {"diff": self.diff}


def lora_from_dense(delta: Tensor, rank: int | None = None) -> tuple[LoRA, float]:
    """Exact-as-possible LoRA of a dense delta by thin SVD (tall orientation); returns it and its rel. error."""
    d = _f32(delta).flatten(1)
    wide = d.shape[0] < d.shape[1]
    u, s, vh = torch.linalg.svd(d.T if wide else d, full_matrices=False)
    if wide:
        u, vh = vh.T, u.T
    k = int(rank) if rank else int((s > s[0] * 1e-7).sum().item()) if s.numel() and s[0] > 0 else 1
    k = max(1, min(k, s.numel()))
    up, down = u[:, :k] * s[:k], vh[:k]
    total = float(s.square().sum())
    err = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    shape = tuple(delta.shape)
    down_t = down.reshape(k, *shape[1:])
    up_t = up.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    return LoRA(alpha=float(k), down=down_t.contiguous(), up=up_t.contiguous()), err
