"""Per-block multiplier schemes (``lorakit merge --blocks``), declared per architecture as data.

A scheme gives every module a *slot chain*: slot ids from the most specific to the most general (FLUX.1's
``txt_in`` is ``("IN", "BASE")``, an SD UNet module of ``input_blocks.4`` is ``("IN04",)``). A multiplier vector
is a list of slot ids; a module takes the value of the first id of its chain that the vector lists, else the
vector's ``unlisted`` value; a module whose chain is empty always keeps 1.

Chains come from the layout: a denoiser module repeated per block (``repeat`` = a :class:`Run`'s count) gets that
block's id; otherwise its ``group`` is looked up in :attr:`BlockScheme.groups`; any other denoiser module gets
:attr:`BlockScheme.unplaced`. A module of another component (a text encoder) gets the chain of its role.

Sources: LoRA Block Weight (hako-mikan/sd-webui-lora-block-weight ``scripts/lora_block_weight.py``:
``BLOCKID26/17/12/20``, ``BLOCKIDFLUX``, ``to26``, ``DEF_WEIGHT_PRESET``, ``ratiodealer``). There a 12-, 17- or
20-value vector is spread over the 26 ids and *every id it does not list gets 0*; BASE is every text-encoder
module; modules in no block (``time_embed``, ``label_emb``, ``out``) are "not picked" and keep 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    """One slot per block of a repeated denoiser module: ``Run("double", "D")`` gives ``D00``, ``D01`` …"""

    count: str
    prefix: str

    def id(self, index: int) -> str:
        return f"{self.prefix}{index:02d}"

    def ids(self, n: int) -> tuple[str, ...]:
        return tuple(self.id(i) for i in range(n))


Part = str | Run


@dataclass(frozen=True)
class Vector:
    """An accepted plain multiplier list: its slots in order (a :class:`Run` stands for all its blocks). A module
    whose chain names none of them gets ``unlisted``. ``kind`` is reported (``"vector"`` or ``"lbw"``)."""

    name: str
    parts: tuple[Part, ...]
    kind: str = "vector"
    unlisted: float = 1.0


@dataclass(frozen=True)
class BlockPreset:
    """A named vector (``--blocks OUTALL``): ``values`` over ``vector``'s slots."""

    name: str
    vector: Vector
    values: tuple[float, ...]


@dataclass(frozen=True)
class BlockScheme:
    """How ``--blocks`` addresses one architecture (see the module docstring)."""

    vectors: tuple[Vector, ...] = ()
    runs: tuple[Run, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # denoiser group -> chain
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)    # other components, by role -> chain
    unplaced: tuple[str, ...] = ()       # denoiser modules in no run or listed group; other roles
    presets: tuple[BlockPreset, ...] = ()
    example: str = ""                    # a selector spec shown in hints
    summary: str = ""                    # one sentence for --help


# ---------------------------------------------------------------------------------------------
# FLUX.1: vectors derived from the double/single block counts; LBW's 61-value vector (BLOCKIDFLUX)
# ---------------------------------------------------------------------------------------------

_DOUBLE, _SINGLE = Run("double", "D"), Run("single", "S")

FLUX1_BLOCKS = BlockScheme(
    runs=(_DOUBLE, _SINGLE),
    groups={"embedders": ("IN", "BASE"), "final_layer": ("OUT", "BASE")},
    roles={"te1": ("CLIP", "TE", "BASE"), "te2": ("T5", "TE", "BASE")},
    unplaced=("BASE",),
    vectors=(
        Vector("double + single blocks", (_DOUBLE, _SINGLE)),
        Vector("BASE (every module outside the blocks) + blocks", ("BASE", _DOUBLE, _SINGLE)),
        Vector("blocks + IN + OUT", (_DOUBLE, _SINGLE, "IN", "OUT")),
        Vector("blocks + IN + OUT + TE (CLIP-L and T5 together)", (_DOUBLE, _SINGLE, "IN", "OUT", "TE")),
        Vector("LoRA Block Weight FLUX", ("CLIP", "T5", "IN", _DOUBLE, _SINGLE, "OUT"), kind="lbw"),
    ),
    example="double_blocks.0-5=0.5,single_blocks=1.2,txt_in=0",
    summary="double+single block values (FLUX.1-dev: 57; BASE first: 58; then IN,OUT: 59; then TE: 60) or "
            "LoRA Block Weight's CLIP,T5,IN,D00…,S00…,OUT (61); ids D00…, S00…, IN, OUT, CLIP, T5, TE, BASE; "
            "names such as double_blocks.0-5=0.5,single_blocks=1.2,txt_in=0",
)


# ---------------------------------------------------------------------------------------------
# SD1.x / SD2.x / SDXL: LoRA Block Weight ids (verbatim order) and presets (all written in BLOCKID17)
# ---------------------------------------------------------------------------------------------

def _ids(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


BLOCKID26 = _ids("BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,IN09,IN10,IN11,M00,"
                 "OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11")
BLOCKID17 = _ids("BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11")
BLOCKID12 = _ids("BASE,IN04,IN05,IN07,IN08,M00,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05")
BLOCKID20 = _ids("BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,M00,"
                 "OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08")

# DEF_WEIGHT_PRESET without FLUXALL (verbatim)
_LBW_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""

_BASE = ("BASE",)
_TEXT_ENCODERS = {role: _BASE for role in ("te1", "te2", "te3")}   # BASE = every text-encoder module


def _lbw(name: str, ids: tuple[str, ...]) -> Vector:
    return Vector(f"LoRA Block Weight, {name}", ids, kind="lbw", unlisted=0.0)


LBW17 = _lbw("BASE + attention blocks", BLOCKID17)
LBW26 = _lbw("all blocks", BLOCKID26)
LBW12 = _lbw("BASE + attention blocks", BLOCKID12)
LBW20 = _lbw("all blocks", BLOCKID20)

# presets are SD1 17-value vectors; on SDXL they apply by block id (ids they do not list get 0), as in LBW
LBW_PRESETS = tuple(BlockPreset(name, LBW17, tuple(float(v) for v in values.split(",")))
                    for name, _, values in (line.partition(":") for line in _LBW_PRESETS.splitlines()))


def _sd_scheme(all_ids: tuple[str, ...], vectors: tuple[Vector, ...], summary: str) -> BlockScheme:
    return BlockScheme(vectors=vectors, groups={i: (i,) for i in all_ids if i != "BASE"}, roles=_TEXT_ENCODERS,
                       presets=LBW_PRESETS, example="IN04=0.5,OUT05=0,input_blocks.7=0.8", summary=summary)


SD_BLOCKS = _sd_scheme(BLOCKID26, (LBW17, LBW26), (
    "LoRA Block Weight vectors of 17 (BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03…OUT11) or 26 values (BASE,"
    "IN00…IN11,M00,OUT00…OUT11), ids a vector does not list get 0, BASE = every text-encoder module, time/label "
    f"embeddings and conv_out keep 1; presets {', '.join(p.name for p in LBW_PRESETS)}; ids such as IN04=0.5,"
    "OUT05=0,BASE=0; single-file names such as input_blocks.4=0.5, or unet=0, clip_l=0"))
SDXL_BLOCKS = _sd_scheme(BLOCKID20, (LBW12, LBW20), (
    "LoRA Block Weight vectors of 12 (BASE,IN04,IN05,IN07,IN08,M00,OUT00…OUT05) or 20 values (BASE,IN00…IN08,M00,"
    "OUT00…OUT08) with SD 1.x's rules; "
    "the presets are SD 1.x vectors applied by id, as LoRA Block Weight does (SDXL's IN00, IN03, IN06 and "
    "OUT00…OUT02 get 0)"))
