"""lorakit bake BASE IN[:WEIGHT] … -o OUT [--dtype …] [--device cpu|cuda] [--allow-partial] [--dry-run] …"""

from __future__ import annotations

import argparse
import os
from typing import Any

from lorakit.ops.baking import bake, flagged_components, format_plan
from lorakit.errors import UsageError
from lorakit.layouts import available, resolve
from lorakit.ops.recipes import RecipeSchema, WeightedInput, load_recipe, opt, parse_weighted, refuse_recipe_as_output
from lorakit.progress import terminal_progress
from lorakit.cli.common import add_dtype, add_json, add_models, add_output, add_pickle, emit_json, models_inputs, say, status

HELP = "bake LoRAs into a base model (streaming, fp32 accumulation, same layout out)"

# recipe keys (the long options, plus `base` and `inputs`) and the type each value must have
RECIPE_SCHEMA: RecipeSchema = {"base": str, "output": str, "dtype": str, "device": opt(str, choices=("cpu", "cuda")),
                 "allow_partial": bool, "allow_zero_lora": bool, "dry_run": bool,
                 **{k: str for name in flagged_components() for k in (name, f"{name}_out")},
                 "component": list, "allow_pickle": bool, "json": bool}
RECIPE_KEYS = ("base", "inputs", *RECIPE_SCHEMA)


def _layouts() -> str:
    """The registered architectures' denoisers and the layouts their bases come in (help text from the layouts)."""
    return "; ".join(f"{a.denoiser.label}" + (f" {a.base_layouts}" if a.base_layouts else "")
                     for a in (resolve(n) for n in available()))


def _flag_names() -> str:
    flags = flagged_components()
    return ", ".join(f"{n}, the same as --{c.flag}" for n, c in flags.items()) or "see lorakit inspect"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bake`` subcommand to the parser."""
    p = sub.add_parser(
        "bake", help=HELP,
        description=HELP + ". BASE is a checkpoint of a supported architecture (" + _layouts() + "), a single "
        "file or a sharded folder, or a single-file checkpoint holding a denoiser and text encoders together (each component it holds gets its LoRA modules; "
        "other tensors, e.g. a VAE, are copied untouched), or a diffusers pipeline folder with model_index.json "
        "(its denoiser and text-encoder subfolders are baked, everything else copied; -o is then a new folder). "
        "The output keeps that layout and the base's dtypes "
        "(--dtype converts the denoiser's floating tensors only; other components of a full checkpoint and the "
        "text encoders keep theirs). Each LoRA "
        "(any readable format) is added as W + Σ weight·ΔW in fp32 and cast back once. Nothing is written unless "
        "every LoRA module fits the base (see --allow-partial). DoRA modules use PEFT's formula, "
        "each relative to the base weight: + m·(W0 + s·ΔW)/‖W0 + s·ΔW‖ − W0 (independent of the input order).")
    p.add_argument("paths", nargs="*", metavar="BASE IN[:WEIGHT]",
                   help="the base model, then one or more LoRAs with optional :weight (default 1)")
    add_output(p, required=False)
    p.add_argument("--flux-model", "--flux_model", dest="base", default=None, metavar="BASE",
                   help="the base model (sd-scripts spelling; then every positional path is a LoRA)")
    add_models(p)
    add_dtype(p, "keep each base tensor's dtype")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="where ΔW is computed (default cpu)")
    p.add_argument("--timings", action="store_true",
                   help="print the seconds each stage took (read, compute, write, copy, waits, commit; --json always "
                        "has them)")
    p.add_argument("--allow-partial", action="store_true", default=None,
                   help="bake the modules that fit and report those that do not (default: refuse)")
    p.add_argument("--allow-zero-lora", action="store_true", default=None,
                   help="bake even a LoRA whose up matrices are all zero (it changes nothing; default: refuse)")
    p.add_argument("--dry-run", action="store_true", default=None,
                   help="print the per-tensor plan; read no base tensor data, write nothing")
    p.add_argument("--requant", default=None, metavar="TYPE",
                   help="GGUF bases: the type baked tensors are written as when their own cannot be (K-quants): "
                        "q8_0, q5_0, q5_1, q4_0, q4_1, bf16, f16 (default: refuse)")
    for name, comp in flagged_components().items():    # e.g. FLUX.1's --clip-l/--t5 (layout data)
        file_alias, out_alias = comp.flag_aliases
        p.add_argument(f"--{comp.flag}", *([f"--{file_alias}"] if file_alias else []), dest=name, default=None,
                       metavar="FILE", help=f"{comp.label} file to bake the LoRAs' {comp.label} modules into")
        p.add_argument(f"--{comp.flag}-out", *([f"--{out_alias}"] if out_alias else []), dest=f"{name}_out",
                       default=None, metavar="OUT",
                       help=f"where the baked {comp.label} is written (same layout as --{comp.flag})")
    p.add_argument("--component", action="append", default=None, metavar="NAME=FILE[:OUT]",
                   help="a component the base does not hold, as a separate file to bake that component's LoRA "
                        "modules into, written to OUT (same layout as FILE; OUT may be left out with --dry-run); "
                        "NAME is the architecture's component name (" + _flag_names() + "); "
                        "repeatable")
    p.add_argument("--recipe", default=None, metavar="FILE.yaml",
                   help="options from a YAML file (keys: base, inputs, output and the long options); explicit "
                        "command-line values win")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def _resolve(args: argparse.Namespace) -> tuple[str, list[WeightedInput]]:
    recipe = load_recipe(args.recipe, RECIPE_SCHEMA) if args.recipe else {}
    if args.recipe:   # paths in a recipe are relative to the recipe's folder (as its inputs are)
        here = os.path.dirname(os.path.abspath(args.recipe))
        for key in ("base", "output", *(k for name in flagged_components() for k in (name, f"{name}_out"))):
            if isinstance(recipe.get(key), str) and not os.path.isabs(recipe[key]):
                recipe[key] = os.path.join(here, recipe[key])
        if "component" in recipe:
            recipe["component"] = [_relative_component(v, here) for v in recipe["component"]]
    for key in RECIPE_KEYS:
        if key in ("base", "inputs"):
            continue
        if getattr(args, key, None) in (None, False) and key in recipe:
            setattr(args, key, recipe[key])
    paths = list(args.paths)
    base = args.base
    if base is None and paths:
        base = paths.pop(0)
    if base is None:
        base = recipe.get("base")
    inputs = [parse_weighted(x) for x in paths]
    inputs += models_inputs(args)
    if not inputs:
        inputs = list(recipe.get("inputs") or [])
    if base is None:
        raise UsageError("no base model given.", hint="lorakit bake BASE LORA[:WEIGHT] … -o OUT")
    if not inputs:
        raise UsageError("no LoRA given.", hint="lorakit bake BASE LORA[:WEIGHT] … -o OUT")
    return str(base), inputs


def parse_component(text: object) -> tuple[str, tuple[str, str | None]]:
    """``NAME=FILE[:OUT]`` -> (name, (file, out)); OUT is what follows the last ``:``."""
    if not isinstance(text, str) or "=" not in text:
        raise UsageError(f"bad --component {text!r}.",
                         hint="write --component NAME=FILE:OUT (e.g. te=encoder.safetensors:encoder_baked.safetensors).")
    name, _, rest = text.partition("=")
    file, sep, out = rest.rpartition(":")
    if not sep:
        file, out = rest, ""
    if not name or not file:
        raise UsageError(f"bad --component {text!r}.", hint="write --component NAME=FILE:OUT.")
    return name, (file, out or None)


def _relative_component(text: object, here: str) -> str:
    """A recipe's ``NAME=FILE[:OUT]`` entry with relative paths resolved against the recipe's folder."""
    name, (file, out) = parse_component(text)
    file = file if os.path.isabs(file) else os.path.join(here, file)
    out = out if out is None or os.path.isabs(out) else os.path.join(here, out)
    return f"{name}={file}" + (f":{out}" if out else "")


def _components(args: argparse.Namespace) -> dict[str, tuple[str, str | None]]:
    found: dict[str, tuple[str, str | None]] = {}
    for text in args.component or ():
        name, paths = parse_component(text)
        if name in found:
            raise UsageError(f"--component {name} given twice.", hint="give each component once.")
        found[name] = paths
    return found


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit bake`` and print its report; returns the exit code."""
    base, inputs = _resolve(args)
    components = _components(args)
    flagged = {name: (getattr(args, name), getattr(args, f"{name}_out")) for name in flagged_components()}
    refuse_recipe_as_output(args.recipe, (args.output, *(o for _f, o in flagged.values()),
                                          *(o for _f, o in components.values())))
    r = bake(base, inputs, args.output, dtype=args.dtype, device=args.device or "cpu",
             allow_partial=bool(args.allow_partial), dry_run=bool(args.dry_run), flagged=flagged,
             components=components,
             allow_pickle=bool(args.allow_pickle),
             progress=terminal_progress("bake", enabled=not (args.no_progress or args.dry_run or args.json),
                                        unit="bytes"),
             allow_zero_lora=bool(args.allow_zero_lora), requant=args.requant)
    if args.json:
        emit_json(r.to_json())
        return status(r.skipped, r.not_applied, r.warnings)
    if r.dry_run:
        for line in format_plan(r):
            print(line)
    for i in r.inputs:
        say(f"{i['path']} ×{i['weight']:g}: {i['format']}, {i['applied']} of {i['modules']} modules applied"
            + (f", {i['skipped']} skipped" if i["skipped"] else ""))
    for w in r.warnings:
        say(f"  warning: {w}")
    verb = "would write" if r.dry_run else "wrote"
    rate = f", {r.bytes_in / r.seconds / 1e9:.2f} GB/s" if r.seconds and not r.dry_run else ""
    say(f"{r.base} ({r.layout}, {r.variant}) → {verb} {r.output or '-'}: {r.changed} tensors baked, "
        f"{r.converted} converted, {r.copied} copied; {r.bytes_out / 1e9:.2f} GB, dtype {r.dtype}"
        + (f" in {r.seconds:.1f} s{rate}" if not r.dry_run else ""))
    for te in r.text_encoders:
        say(f"  {te['component']}: {te['changed']} tensors baked → {verb} {te['output'] or '-'}")
    if r.quantized:
        q: Any = r.quantized
        low = min(q["blocks"], key=lambda b: b["retention"]) if q["blocks"] else None
        say(f"  {q['convention']}: {q['requantized']} tensors requantized ({', '.join(q['policy'])}), "
            f"delta retention {q['retention']:.1%}"
            + (f" (lowest block {low['block']}: {low['retention']:.1%})" if low else ""))
    if r.stages and getattr(args, "timings", False):
        say("  stages (s, overlapping): " + ", ".join(f"{k} {v:.2f}" for k, v in r.stages.items()))
    return status(r.skipped, r.not_applied, r.warnings)
