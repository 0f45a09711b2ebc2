"""lorakit merge IN[:WEIGHT] … -o OUT [--method …] [--rank N [--conv-rank M] | --dynamic METHOD:PARAM] [--to …]
[--blocks SPEC]"""

from __future__ import annotations

import argparse
import os
from typing import Any

from lorakit.ops.blocks import BLOCKS_HELP
from lorakit.errors import RecipeError
from lorakit.formats import WRITABLE
from lorakit.ops.merging import MAJORITY_SIGN, get_merge_method, merge, merge_methods
from lorakit.ops.recipes import WeightedInput, load_recipe, opt, parse_weighted, refuse_recipe_as_output
from lorakit.progress import terminal_progress
from lorakit.cli.common import (add_dtype, add_json, add_models, add_output, add_pickle, dtype_arg, emit_json, models_inputs,
                     say, status)

HELP = "merge several LoRAs into one (exact concat by default)"

DESCRIPTION = (
    "Merge LoRAs from any readable format. Strength is linear: the result is Σ weight_i·ΔW_i per module, where "
    "ΔW_i includes each file's alpha/rank (weights may be negative or above 1). concat (default) is exact: ranks "
    "add up. svd keeps the exact best rank-N approximation of the sum (no dense matrices). ties / dare_linear / "
    "dare_ties apply PEFT's definitions to each module's dense delta, then an SVD to the output rank. Convolutions (SD1.5/SDXL LoCon) are merged in the flattened "
    "(out, in·k·k) view: concat keeps their 4-D factors exactly, svd/ties/dare truncate 3×3 kernels to --conv-rank.")

# option name (dest) -> default, applied after the recipe (explicit command-line values win over both)
DEFAULTS: dict[str, Any] = {"method": "concat", "to": "kohya", "verify": False, "dry_run": False, "json": False,
                            "kohya_ratios": False, "allow_partial": False, "allow_pickle": False,
                            "split_experts": False}


def recipe_schema() -> dict[str, Any]:
    """The recipe keys and their types; ``method`` takes the merge methods registered now."""
    return {"output": str, "method": opt(str, choices=merge_methods()), "rank": int, "conv_rank": int,
            "dynamic": str, "to": opt(str, choices=WRITABLE), "blocks": opt(str, list, dict), "verify": bool,
            "dtype": str, "json": bool, "dry_run": bool, "density": float,
            "majority_sign": opt(str, choices=MAJORITY_SIGN), "seed": int, "kohya_ratios": bool,
            "allow_partial": bool, "allow_pickle": bool, "split_experts": bool}


RECIPE_KEYS = tuple(recipe_schema())


def method_help() -> str:
    """``--method``'s help: every registered method with its one-line description."""
    return f"merge method (default: {DEFAULTS['method']}): " + "; ".join(
        f"{name}: {get_merge_method(name).help}" for name in merge_methods())


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``merge`` subcommand to the parser."""
    p = sub.add_parser("merge", help=HELP, description=DESCRIPTION)
    p.add_argument("inputs", nargs="*", metavar="IN[:WEIGHT]", help="LoRA files, each with an optional :weight "
                   "(default 1.0)")
    add_output(p, required=False)
    add_models(p)
    p.add_argument("--method", choices=merge_methods(), default=None, help=method_help())
    p.add_argument("--rank", "--new-rank", "--new_rank", dest="rank", type=int, default=None, metavar="N",
                   help="output rank for svd/ties/dare (default: the largest input rank of each module); "
                        "with --dynamic, the rank cap")
    p.add_argument("--conv-rank", "--conv_rank", "--conv-dim", "--conv_dim", "--new-conv-rank", "--new_conv_rank",
                   dest="conv_rank", type=int, default=None, metavar="M",
                   help="output rank of convolutions with a kernel larger than 1×1 (SD1.5/SDXL LoCon 3×3) for "
                        "svd/ties/dare; 1×1 convolutions take --rank, as in sd-scripts' svd_merge_lora "
                        "(default: --rank's rule); with --dynamic, their rank cap")
    p.add_argument("--dynamic", default=None, metavar="METHOD:PARAM",
                   help="rank per module from its singular values: sv_ratio:R (R > 1), sv_fro:F or sv_cumulative:F "
                        "(F in (0, 1])")
    p.add_argument("--dynamic-method", "--dynamic_method", dest="dynamic_method", default=None,
                   choices=("sv_ratio", "sv_fro", "sv_cumulative"), help="sd-scripts spelling of --dynamic's METHOD")
    p.add_argument("--dynamic-param", "--dynamic_param", dest="dynamic_param", type=float, default=None,
                   metavar="PARAM", help="sd-scripts spelling of --dynamic's PARAM")
    p.add_argument("--concat", action="store_true", default=None,
                   help="sd-scripts spelling: concatenate the factors (exact; lorakit's default method)")
    p.add_argument("--precision", default=None, metavar="DTYPE",
                   help="sd-scripts' merging precision: lorakit always merges in fp32/fp64; as in sd-scripts, "
                        "it is also the output dtype when --dtype/--save_precision is not given")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="sd-scripts spelling; LoRA factors are merged on the CPU (they are small)")
    p.add_argument("--to", choices=WRITABLE, default=None, help="output format (default: kohya)")
    p.add_argument("--blocks", default=None, metavar="SPEC", help=BLOCKS_HELP)
    p.add_argument("--split-experts", action="store_true", default=None,
                   help="paired experts (Wan 2.2 A14B): one file per expert, OUT_high_noise / OUT_low_noise "
                        "(default: one file holding both, which needs --to aitoolkit)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="re-read the written file and report each module's relative error against the exact "
                        "weighted sum (ties/dare: against the module's untruncated result); the worst is printed")
    p.add_argument("--recipe", default=None, metavar="FILE.yaml",
                   help="read options from a YAML recipe (keys = long option names, plus 'inputs'; paths are "
                        "relative to the recipe); options given on the command line win")
    add_dtype(p, "the inputs' dtype when they agree, else fp32")
    p.add_argument("--density", type=float, default=None, metavar="D",
                   help="ties/dare: fraction of entries kept, in (0, 1] (required for those methods)")
    p.add_argument("--majority-sign", choices=MAJORITY_SIGN, default=None,
                   help="ties/dare_ties sign election (default: total)")
    p.add_argument("--seed", type=int, default=None, help="dare_*: random seed (default 0; same seed, same bytes)")
    p.add_argument("--kohya-ratios", action="store_true", default=None,
                   help="reproduce sd-scripts' concat coefficients (each LoRA lands at ratio·|ratio|·rank/total "
                        "rank) for parity checks; the default is linear strength (weight·ΔW)")
    p.add_argument("--allow-partial", action="store_true", default=None,
                   help="merge even if some input keys are not understood (they are left out and reported)")
    p.add_argument("--dry-run", action="store_true", default=None, help="merge and report, write nothing")
    add_json(p)
    p.set_defaults(json=None)
    add_pickle(p)
    p.set_defaults(allow_pickle=None)
    p.set_defaults(run=run)


def _apply_recipe(args: argparse.Namespace) -> None:
    if args.recipe:
        recipe = load_recipe(args.recipe, recipe_schema())
        base = os.path.dirname(os.path.abspath(args.recipe))
        for key, value in recipe.items():
            if key == "inputs":
                if not args.inputs:
                    args.inputs = value
                continue
            if getattr(args, key, None) is not None:
                continue
            if key == "output" and isinstance(value, str) and not os.path.isabs(value):
                value = os.path.join(base, value)
            if key == "blocks":
                value = _blocks_value(value, args.recipe)
            setattr(args, key, value)
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _blocks_value(value: Any, path: str) -> str:
    """A recipe may give blocks as a string, a list of numbers or a mapping of selectors."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    raise RecipeError(f"bad 'blocks' value {value!r}.", path=path)


def _inputs(values: list[Any]) -> list[WeightedInput]:
    return [v if isinstance(v, WeightedInput) else parse_weighted(str(v)) for v in values]


def _sd_scripts_options(args: argparse.Namespace) -> list[str]:
    """Fold sd-scripts' spellings into lorakit's options; returns the notes to print."""
    from lorakit.dtypes import parse_dtype
    from lorakit.errors import UsageError
    from lorakit.cli.extract_cmd import dynamic_arg
    notes: list[str] = []
    args.dynamic = dynamic_arg(args)
    if args.concat:
        if args.method not in (None, "concat"):
            raise UsageError(f"--concat and --method {args.method} contradict each other.",
                             hint="--concat is lorakit's default method; give one of them.")
        args.method = "concat"
    if args.precision is not None:
        precision = parse_dtype(args.precision)     # a bad spelling is refused like --dtype's
        notes.append("--precision: lorakit always merges in fp32 (fp64 for the SVD cores)"
                     + (f"; the output is stored as {args.precision} (sd-scripts: the save precision defaults to "
                        "the merging precision)" if args.dtype is None and precision is not None else ""))
        if args.dtype is None and precision is not None:
            args.dtype = args.precision
    if args.device == "cuda":
        notes.append("--device cuda: LoRA factors are merged on the CPU (they are small).")
    return notes


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit merge`` and print its report; returns the exit code."""
    _apply_recipe(args)
    refuse_recipe_as_output(args.recipe, (args.output,))
    notes = _sd_scripts_options(args)
    r = merge(_inputs(args.inputs or []) + models_inputs(args), args.output, method=args.method, rank=args.rank,
              conv_rank=args.conv_rank, dynamic=args.dynamic,
              to=args.to, blocks=args.blocks, verify=bool(args.verify), dtype=dtype_arg(args), density=args.density,
              majority_sign=args.majority_sign, seed=args.seed, kohya_ratios=bool(args.kohya_ratios),
              dry_run=bool(args.dry_run), allow_partial=bool(args.allow_partial),
              allow_pickle=bool(args.allow_pickle), progress=terminal_progress("merge", enabled=not args.json),
              split_experts=bool(args.split_experts))
    if args.json:
        emit_json(r.to_json())
        return status(r.warnings)
    verb = "would write" if r.dry_run else "wrote"
    names = " + ".join(f"{os.path.basename(str(i['path']))}:{i['weight']:g}" for i in r.inputs)
    ranks = f"rank {r.ranks[0]}–{r.ranks[1]}" if r.ranks and r.ranks[0] != r.ranks[1] else \
        f"rank {r.ranks[0]}" if r.ranks else "no LoRA modules"
    say(f"{names} → {r.method} ({r.architecture}, {r.variant}); {r.modules_out} modules, {ranks}, "
        f"{r.tensors_out} tensors ({r.dtype}, {r.target_format}); {verb} {r.output or '-'}")
    if r.kohya_ratios:
        say("  strength: sd-scripts coefficients (--kohya-ratios), not linear")
    if r.blocks:
        say(f"  blocks: {r.blocks}" + (f" ({len(r.dropped)} modules at 0 left out)" if r.dropped else ""))
    worst = r.min_retained_energy
    if worst:
        say(f"  lowest retained energy: {worst[1]:.6f} in {worst[0]}")
    if r.verify:
        say(f"  verify: max relative error {float(str(r.verify['max_relative_error'])):.3e} in {r.verify['worst_module']} "
            f"(against the {r.verify['reference']})")
    if r.rounding is not None:
        say(f"  storing the merged factors as {r.dtype} adds up to {r.rounding[1]:.2e} relative error "
            f"({r.rounding[0]}); --dtype fp32 keeps them exact")
    for n in notes:
        say(f"  note: {n}")
    for w in r.warnings:
        say(f"  warning: {w}")
    return status(r.warnings)
