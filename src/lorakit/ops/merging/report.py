"""What a merge did: per-module statistics and the report."""

from __future__ import annotations

from dataclasses import dataclass, field



@dataclass
class ModuleStat:
    module: str
    rank: int
    retained_energy: float | None = None      # svd / ties / dare: Σ_{i<k} σ² / Σ σ² of the matrix truncated
    relative_error: float | None = None
    kernel: tuple[int, ...] | None = None     # a convolution's kernel (None: Linear)

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class MergeReport:
    inputs: list[dict[str, object]]
    output: str | None
    method: str
    target_format: str
    architecture: str
    variant: str
    modules_out: int
    tensors_out: int
    dtype: str | None
    rank: int | None = None
    conv_rank: int | None = None
    dynamic: str | None = None
    seed: int | None = None
    density: float | None = None
    blocks: str | None = None
    kohya_ratios: bool = False
    modules: list[ModuleStat] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)           # modules whose block multiplier is 0
    verify: dict[str, object] | None = None
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    rounding: tuple[str, float] | None = None   # (module, rel. error) storing the merged factors in dtype adds

    @property
    def ranks(self) -> tuple[int, int] | None:
        r = [m.rank for m in self.modules if m.rank]
        return (min(r), max(r)) if r else None

    @property
    def min_retained_energy(self) -> tuple[str, float] | None:
        e = [(m.module, m.retained_energy) for m in self.modules if m.retained_energy is not None]
        return min(e, key=lambda x: x[1]) if e else None

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["modules"] = [m.to_json() for m in self.modules]
        d["rank_range"] = list(self.ranks) if self.ranks else None
        worst = self.min_retained_energy
        d["min_retained_energy"] = {"module": worst[0], "retained_energy": worst[1]} if worst else None
        d["rounding"] = {"module": self.rounding[0], "relative_error": self.rounding[1]} if self.rounding else None
        return d
