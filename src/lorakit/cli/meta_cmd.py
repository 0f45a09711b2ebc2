"""lorakit meta FILE [--set KEY=VALUE]… [--delete KEY]… [--copy-from OTHER] [--rehash] [-o OUT] [--json] [--check]"""

from __future__ import annotations

import argparse
import json

from lorakit.io.header import loads_json
from lorakit.ops.metaedit import audit_lora_metadata, edit_metadata, parse_assignment, read_metadata
from lorakit.cli.batch_cli import add_batch, batch_items, batch_mode, run_cli_batch
from lorakit.cli.common import add_json, emit_json, say

HELP = "show, edit or audit safetensors metadata (kohya ss_*, modelspec.*, diffusers, AI-Toolkit)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``meta`` subcommand to the parser."""
    p = sub.add_parser("meta", help=HELP, description=HELP + ". Without edit options it prints the metadata "
                       "(--json decodes JSON-encoded values). Edits rewrite the file atomically (temporary file "
                       "in the same folder, then rename); without -o the input is replaced — the only lorakit "
                       "command that replaces its input. sshs_* hashes are recomputed when ss_* keys change.")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="safetensors file; several files, folders and glob patterns run as a batch (edits go to "
                        "-o OUTDIR with the names kept, or in place without -o)")
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                   help="set a key (repeatable)")
    p.add_argument("--delete", action="append", default=[], metavar="KEY",
                   help="delete a key or glob pattern such as 'ss_tag_*' (repeatable; must match)")
    p.add_argument("--copy-from", default=None, metavar="OTHER",
                   help="copy OTHER's metadata over this file's (never its hashes or provenance)")
    p.add_argument("--rehash", action="store_true",
                   help="recompute sshs_model_hash, sshs_legacy_hash (and modelspec.hash_sha256 if present)")
    p.add_argument("-o", "--output", dest="output", default=None, metavar="OUT",
                   help="write the edited file here instead of replacing FILE")
    p.add_argument("--check", action="store_true",
                   help="audit a LoRA: do ss_network_dim/alpha/module, base version, modelspec.architecture and "
                        "the stored hashes match its tensors? (exit 1 if not)")
    add_batch(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit meta``: show, edit or audit metadata; returns the exit code."""
    editing = bool(args.set_items or args.delete or args.copy_from or args.rehash)
    if batch_mode(args, args.files):
        from lorakit.ops.batch_tasks import MetaTask
        if args.output and not editing:
            from lorakit.errors import UsageError
            raise UsageError("-o needs an edit (--set, --delete, --copy-from or --rehash).")
        task = MetaTask(check=args.check, set_items=tuple(parse_assignment(s) for s in args.set_items),
                        delete=tuple(args.delete), copy_from=args.copy_from, rehash=args.rehash)
        return run_cli_batch(args, task, batch_items(args, args.files, writing=False), "meta")
    args.file = args.files[0]
    if args.check:
        problems = audit_lora_metadata(args.file)
        if args.json:
            emit_json({"file": args.file, "problems": problems})
        else:
            print("\n".join(f"{args.file}: {p}" for p in problems) or f"{args.file}: metadata consistent")
        return 1 if problems else 0
    if not editing:
        if args.output:
            from lorakit.errors import UsageError
            raise UsageError("-o needs an edit (--set, --delete, --copy-from or --rehash).")
        meta = read_metadata(args.file, nested=args.json)
        if args.json:
            emit_json(meta)
        else:
            for k, v in meta.items():
                text = v
                if v.strip()[:1] in ("{", "["):
                    try:
                        text = json.dumps(loads_json(v), indent=2, ensure_ascii=False).replace("\n", "\n    ")
                    except ValueError:
                        pass
                print(f"{k}: {text}")
        return 0
    items = [parse_assignment(s) for s in args.set_items]
    r = edit_metadata(args.file, set_items=items, delete=args.delete, copy_from=args.copy_from,
                      output=args.output, rehash=args.rehash)
    if args.json:
        emit_json(r.to_json())
    else:
        where = "in place" if r.in_place else f"to {r.output}"
        say(f"{r.file}: {len(r.changed)} key(s) set, {len(r.removed)} removed"
            + (f", recomputed {', '.join(r.rehashed)}" if r.rehashed else "") + f"; written {where}")
    return 0
