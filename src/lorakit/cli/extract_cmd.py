"""lorakit extract ORIGINAL TUNED -o OUT (--rank N | --dynamic METHOD:PARAM)"""

from __future__ import annotations

import argparse

from lorakit.ops.extraction import DEFAULT_TE_MIN_DIFF
from lorakit.formats import WRITABLE
from lorakit.progress import ProgressBar, terminal_progress  # noqa: F401 (ProgressBar: re-exported)
from lorakit.cli.common import add_dtype, add_json, add_output, add_pickle, dtype_arg, emit_json, say, status

HELP = "extract a LoRA from the difference of a fine-tuned model and its base"


def add_dynamic(p: argparse.ArgumentParser) -> None:
    """Add ``--dynamic`` (and sd-scripts' ``--dynamic_method``/``--dynamic_param``) to a command."""
    p.add_argument("--dynamic", default=None, metavar="METHOD:PARAM",
                   help="rank per module from its singular values: sv_ratio:R (keep s_i > s_0/R, R > 1), sv_fro:F "
                        "(keep a fraction F in (0, 1] of the Frobenius norm), sv_cumulative:C (keep a fraction C in "
                        "(0, 1] of Σs_i); capped by --rank")
    p.add_argument("--dynamic-method", "--dynamic_method", dest="dynamic_method", default=None,
                   choices=("sv_ratio", "sv_fro", "sv_cumulative"), help=argparse.SUPPRESS)
    p.add_argument("--dynamic-param", "--dynamic_param", dest="dynamic_param", type=float, default=None,
                   help=argparse.SUPPRESS)


def dynamic_arg(args: argparse.Namespace) -> str | None:
    """--dynamic, or sd-scripts' --dynamic_method/--dynamic_param pair."""
    from lorakit.errors import UsageError
    if args.dynamic_method or args.dynamic_param is not None:
        if args.dynamic:
            raise UsageError("give either --dynamic METHOD:PARAM or --dynamic_method/--dynamic_param, not both.")
        if not args.dynamic_method or args.dynamic_param is None:
            raise UsageError("--dynamic_method and --dynamic_param go together.",
                             hint="or write --dynamic METHOD:PARAM, e.g. --dynamic sv_fro:0.9.")
        return f"{args.dynamic_method}:{args.dynamic_param}"
    return args.dynamic


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``extract`` subcommand to the parser."""
    p = sub.add_parser(
        "extract", help=HELP,
        description=HELP + ". Any registered architecture (FLUX.1, SD1.x, SD2.x, SDXL); ORIGINAL and TUNED may be in "
        "any of its base layouts (FLUX.1: BFL, ComfyUI, diffusers file or sharded folder; SD: single-file "
        "checkpoints or UNet files; even different ones); tensors are paired by component and native module and "
        "the LoRA is written on native targets. Every component both models hold is compared: the denoiser and "
        "each text encoder, which (as in sd-scripts) is extracted only when one of its weights differs by more "
        "than --te-min-diff. Convolutions follow sd-scripts: k×k ones (k > 1) need --conv-rank (--conv_dim) and are "
        "SVD'd as (out, in·k·k); 1×1 ones take --rank. Streams one module at a time. Decomposition: seeded "
        "randomized SVD (same inputs and seed give the same file), or thin SVD with --exact. Every module's "
        "retained energy and relative error are reported. Modules with max|difference| <= --min-diff are skipped "
        "(default 0: only unchanged modules).")
    p.add_argument("original", metavar="ORIGINAL", nargs="?", default=None,
                   help="the base model the fine-tune started from")
    p.add_argument("tuned", metavar="TUNED", nargs="?", default=None, help="the fine-tuned model")
    p.add_argument("--model-org", "--model_org", dest="model_org", default=None, metavar="ORIGINAL",
                   help="ORIGINAL (sd-scripts spelling)")
    p.add_argument("--model-tuned", "--model_tuned", dest="model_tuned", default=None, metavar="TUNED",
                   help="TUNED (sd-scripts spelling)")
    p.add_argument("--clamp-quantile", "--clamp_quantile", dest="clamp_quantile", type=float, default=None,
                   metavar="Q", help="sd-scripts' clamp: both factors (up = U·S, down = Vh) are clamped to ±the "
                   "Q-quantile of their values (sd-scripts' default 0.99). Adds error (measured and reported); "
                   "default: no clamp (the optimal factors)")
    add_output(p, required=False)
    p.add_argument("--rank", "--dim", "--network-dim", "--network_dim", dest="rank", type=int, default=None,
                   metavar="N", help="rank of every module (the cap with --dynamic; default cap 128 there)")
    add_dynamic(p)
    p.add_argument("--conv-rank", "--conv_dim", "--conv-dim", dest="conv_rank", type=int, default=None, metavar="N",
                   help="rank (the cap with --dynamic) of convolutions with kernels larger than 1×1, SVD'd as "
                        "(out, in·k·k) and written as down (r, in, k, k) / up (out, r, 1, 1); without it they are "
                        "left out, as in sd-scripts (reported). 1×1 convolutions take --rank. FLUX.1 has none")
    p.add_argument("--min-diff", "--min_diff", dest="min_diff", type=float, default=0.0, metavar="X",
                   help="skip modules whose largest absolute difference is <= X (default 0: only unchanged ones)")
    p.add_argument("--te-min-diff", "--te_min_diff", dest="te_min_diff", type=float, default=DEFAULT_TE_MIN_DIFF,
                   metavar="X", help="sd-scripts' text-encoder rule (its --min_diff): a text encoder whose weights "
                   "all differ by at most X is the same in both models and not extracted (decided per encoder; "
                   f"default {DEFAULT_TE_MIN_DIFF:g}, sd-scripts' default; 0 extracts any changed encoder)")
    p.add_argument("--to", default="kohya", choices=WRITABLE, help="output format (default: kohya)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda for the decompositions")
    p.add_argument("--exact", action="store_true", help="thin SVD instead of randomized SVD (slower, optimal)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (default 0)")
    p.add_argument("--oversample", type=int, default=16, metavar="N",
                   help="extra columns of the randomized range finder (default 16)")
    p.add_argument("--niter", type=int, default=2, metavar="N", help="power iterations (default 2)")
    p.add_argument("--alpha", "--network-alpha", "--network_alpha", dest="alpha", type=float, default=None,
                   metavar="A", help="store alpha A (default: alpha = rank, scale 1); the up factors are scaled "
                                     "by rank/A so that the delta is unchanged")
    p.add_argument("--include-bias", action="store_true", help="also write bias differences (diff_b entries)")
    p.add_argument("--include-norms", action="store_true",
                   help="also write q/k norm-scale differences (loose parameters) as diff entries")
    p.add_argument("--split-experts", action="store_true",
                   help="paired experts (Wan 2.2 A14B pipeline folders): one file per expert, OUT_high_noise / "
                        "OUT_low_noise (default: one file holding both, which needs --to aitoolkit)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (the tensors of both models paired per native module, shapes, ranks) from "
                        "the headers alone; read no tensor data, write nothing")
    add_dtype(p, "the tuned model's dtype")
    add_json(p)
    add_pickle(p)
    p.set_defaults(run=run)


def _models(args: argparse.Namespace) -> tuple[str, str]:
    """ORIGINAL and TUNED from the positionals and/or sd-scripts' --model_org/--model_tuned."""
    from lorakit.errors import UsageError
    positional = [x for x in (args.original, args.tuned) if x is not None]
    original = args.model_org if args.model_org is not None else (positional.pop(0) if positional else None)
    tuned = args.model_tuned if args.model_tuned is not None else (positional.pop(0) if positional else None)
    if positional:
        raise UsageError(f"one model too many: {positional[0]!r} (ORIGINAL and TUNED are already given).",
                         hint="give each model once, as a positional path or with --model_org/--model_tuned.")
    if original is None or tuned is None:
        raise UsageError("give the base model and the fine-tuned model.",
                         hint="lorakit extract ORIGINAL TUNED -o OUT --rank N (or --model_org/--model_tuned).")
    return original, tuned


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit extract`` and print its report; returns the exit code."""
    from lorakit.ops.extraction import extract, format_plan
    original, tuned = _models(args)
    r = extract(original, tuned, args.output, rank=args.rank, dynamic=dynamic_arg(args),
                conv_rank=args.conv_rank, min_diff=args.min_diff, te_min_diff=args.te_min_diff, to=args.to, device=args.device, exact=args.exact,
                seed=args.seed, alpha=args.alpha, include_bias=args.include_bias, include_norms=args.include_norms,
                dtype=dtype_arg(args), oversample=args.oversample, niter=args.niter, allow_pickle=args.allow_pickle,
                progress=terminal_progress("extract", enabled=not args.json), dry_run=args.dry_run,
                clamp_quantile=args.clamp_quantile, split_experts=args.split_experts)
    code = status(r.unpaired, r.warnings)
    if args.json:
        emit_json(r.to_json())
        return code
    if r.dry_run:
        for line in format_plan(r):
            print(line)
        say(f"{r.original} ({r.original_layout}) → {r.tuned} ({r.tuned_layout}): {r.architecture} {r.variant}; "
            f"{len(r.plan)} module(s) would be compared; would write {r.output or '-'} ({r.format}, {r.dtype})")
        for u in r.unpaired:
            say(f"  unpaired: {u}")
        for w in r.warnings:
            say(f"  warning: {w}")
        return code
    worst = r.worst
    ranks = sorted({m.rank for m in r.modules})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    if r.dynamic:
        rank_text += f" by {r.dynamic}, cap {r.rank or 128}"
    elif r.rank is not None and ranks and ranks[-1] != r.rank:
        rank_text += f"; --rank {r.rank} capped by the module sizes"
    say(f"{r.original} ({r.original_layout}) → {r.tuned} ({r.tuned_layout}): {r.architecture} {r.variant}; "
        f"{len(r.modules)} modules extracted (rank {rank_text}, {r.method}), {len(r.skipped)} unchanged skipped; "
        f"mean retained energy {r.mean_retained_energy:.4f}, worst relative error "
        f"{worst.relative_error:.3e} ({worst.module}); wrote {r.output} ({r.format}, {r.dtype}, "
        f"{r.output_bytes / 1e6:.1f} MB) in {r.seconds:.1f} s" if worst else
        f"wrote {r.output}: bias/norm differences only ({len(r.bias_modules)} biases, {len(r.loose_written)} "
        f"norm scales) in {r.seconds:.1f} s")
    if r.worst_clamp is not None:
        say(f"  --clamp-quantile {r.clamp_quantile:g} (sd-scripts' clamp) adds up to {r.worst_clamp.clamp_error:.2e} "
            f"relative error ({r.worst_clamp.module}); it is included in the errors above; leave it out for the "
            "optimal factors")
    if r.worst_rounding is not None:
        say(f"  storing the factors as {r.dtype} adds up to {r.worst_rounding.rounding_error:.2e} relative error "
            f"({r.worst_rounding.module}) on top of the truncation; --dtype fp32 keeps them exact")
    for u in r.unpaired:
        say(f"  unpaired: {u}")
    for e in r.text_encoders:
        if e["extracted"]:
            say(f"  {e['label']} ({e['component']}): changed (max |difference| {e['max_abs_diff']:.3g} > --te-min-diff "
                f"{r.te_min_diff:g}), extracted")
        else:
            say(f"  {e['label']} ({e['component']}): the same in both models (max |difference| "
                f"{e['max_abs_diff']:.3g} <= --te-min-diff {r.te_min_diff:g}), not extracted")
    for name, keys in r.ignored_keys.items():
        say(f"  ignored {len(keys)} tensors of no compared component in {name} (e.g. {keys[0]!r})")
    for w in r.warnings:
        say(f"  warning: {w}")
    return code
