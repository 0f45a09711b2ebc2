"""What an extraction did: per-module ranks and errors, and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.ops.extraction.decompose import DEFAULT_TE_MIN_DIFF
from lorakit.ops.worst import ROUNDING_FLOOR, worst as worst_of


@dataclass
class ModuleResult:
    module: str                  # native name (``component:name`` outside the main component)
    shape: tuple[int, ...]       # ΔW's shape, out × in × *kernel
    rank: int
    retained_energy: float
    relative_error: float
    max_abs_diff: float
    svd: str
    seconds: float
    rounding_error: float = 0.0     # extra relative error from storing the factors in the output dtype
    clamp_error: float = 0.0        # --clamp-quantile: ‖B'A' − BA‖/‖BA‖ of the clamped factors (0 without it)
    component: str = ""
    noise_floor: float = 0.0        # quantized bases: estimated rounding noise of both sides / ‖D‖ (0: none)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__, shape=list(self.shape))


@dataclass
class ExtractReport:
    original: str
    tuned: str
    output: str | None
    original_layout: str
    tuned_layout: str
    architecture: str
    variant: str
    format: str
    dtype: str
    method: str                          # "randomized_svd" | "exact_svd"
    rank: int | None
    dynamic: str | None
    alpha: float | None
    seed: int
    min_diff: float
    device: str
    modules: list[ModuleResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)          # unchanged modules (max|D| ≤ min_diff)
    unpaired: list[str] = field(default_factory=list)
    ignored_keys: dict[str, list[str]] = field(default_factory=dict)   # input -> tensors of no component (VAE)
    bias_modules: list[str] = field(default_factory=list)     # diff_b written
    bias_differences: list[str] = field(default_factory=list) # differing biases not written (no include_bias)
    loose_differences: list[dict[str, object]] = field(default_factory=list)   # name, max_abs_diff, written
    loose_written: list[str] = field(default_factory=list)    # loose parameters written as diff (include_norms)
    warnings: list[str] = field(default_factory=list)
    tensors_out: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    plan: list[dict[str, object]] = field(default_factory=list)   # dry run: paired tensors per native module
    clamp_quantile: float | None = None   # sd-scripts' --clamp_quantile, when given
    conv_rank: int | None = None          # rank of k×k convolutions (sd-scripts' --conv_dim)
    te_min_diff: float = DEFAULT_TE_MIN_DIFF
    components: list[str] = field(default_factory=list)       # the components both models hold (compared)
    # per text encoder: component, label, max_abs_diff (the largest seen), extracted (sd-scripts' rule)
    text_encoders: list[dict[str, object]] = field(default_factory=list)
    convs_left_out: list[str] = field(default_factory=list)   # changed k×k convolutions (no conv_rank given)

    @property
    def mean_retained_energy(self) -> float:
        return sum(m.retained_energy for m in self.modules) / len(self.modules) if self.modules else 1.0

    @property
    def worst(self) -> ModuleResult | None:
        return worst_of(self.modules, lambda m: m.relative_error)

    @property
    def worst_clamp(self) -> ModuleResult | None:
        """The module whose factors lost most to ``clamp_quantile`` (None without it)."""
        return worst_of(self.modules, lambda m: m.clamp_error, above=0.0)

    @property
    def worst_rounding(self) -> ModuleResult | None:
        """The module whose factors lost most by being stored in the output dtype (None if none lost > 1e-6)."""
        return worst_of(self.modules, lambda m: m.rounding_error, above=ROUNDING_FLOOR)

    def to_json(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["modules"] = [m.to_json() for m in self.modules]
        d["mean_retained_energy"] = self.mean_retained_energy
        worst = self.worst
        d["worst_relative_error"] = {"module": worst.module, "relative_error": worst.relative_error} if worst else None
        rounded = self.worst_rounding
        d["worst_rounding_error"] = ({"module": rounded.module, "rounding_error": rounded.rounding_error}
                                     if rounded else None)
        clamped = self.worst_clamp
        d["worst_clamp_error"] = {"module": clamped.module, "clamp_error": clamped.clamp_error} if clamped else None
        ranks = sorted({m.rank for m in self.modules})
        d["rank_range"] = [ranks[0], ranks[-1]] if ranks else None   # the ranks written (text shows the same)
        if not self.dry_run:
            d.pop("plan")
        return d
