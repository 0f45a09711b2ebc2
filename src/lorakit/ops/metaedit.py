"""``lorakit meta``: show, edit and audit safetensors header metadata.

Edits never touch tensor bytes and never write into the file being read: the new file is streamed,
tensor by tensor, into a temporary file in the same folder and renamed into place (in place = over
the input, atomically — the one command allowed to replace its input). kohya's ``sshs_legacy_hash``
depends on the ``ss_*`` keys, so the ``sshs_*`` hashes are recomputed when ``ss_*`` keys change (or
with ``rehash``); hashes copied from another file are never carried over.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import UsageError
from lorakit.formats import parse
from lorakit.formats.parse import entry_alpha
from lorakit.io.hashes import sshs_hashes_of
from lorakit.io import SafetensorsFile, SafetensorsWriter, open_weights
from lorakit.io.header import loads_json
from lorakit.io.writer import same_file
from lorakit.ops.metadata import STALE_KEYS, STALE_PREFIXES, summarize_values

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def unescape(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Metadata with JSON-encoded values (tag frequencies, network args, adapter configs) decoded."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        text = v.strip()
        if text[:1] in ("{", "["):
            try:
                out[k] = loads_json(text)
                continue
            except ValueError:
                pass
        out[k] = v
    return out


def _open_single(path: str) -> SafetensorsFile:
    f = open_weights(path)
    if not isinstance(f, SafetensorsFile):
        f.close()
        raise UsageError("metadata lives in a single .safetensors file; this is a sharded checkpoint.", path=path,
                         hint="edit one shard file at a time.")
    return f


def read_metadata(path: str | os.PathLike[str], *, nested: bool = False) -> dict[str, Any]:
    """A file's metadata (``nested``: JSON-encoded values decoded)."""
    with _open_single(os.fspath(path)) as f:
        meta = dict(f.metadata)
    return unescape(meta) if nested else dict(sorted(meta.items()))


def parse_assignment(text: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` (UsageError when there is no '=' or no key)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects KEY=VALUE, got {text!r}.", hint="e.g. --set modelspec.title='My LoRA'")
    return key.strip(), value


@dataclass
class MetaEdit:
    file: str
    output: str
    in_place: bool
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rehashed: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["metadata"] = unescape(self.metadata)
        return d


def edit_metadata(path: str | os.PathLike[str], *, set_items: Mapping[str, str] | Sequence[tuple[str, str]] = (),
                  delete: Iterable[str] = (), copy_from: str | os.PathLike[str] | None = None,
                  output: str | os.PathLike[str] | None = None, rehash: bool = False) -> MetaEdit:
    """Rewrite ``path`` (or write ``output``) with edited metadata; tensors are copied byte for byte.

    Order: ``copy_from`` (its keys override, minus hashes and provenance that describe other tensors),
    then ``delete`` (exact keys or glob patterns; each must match something), then ``set_items``.
    """
    src = os.fspath(path)
    items = list(set_items.items()) if isinstance(set_items, Mapping) else list(set_items)
    deletes = list(delete)
    out = os.fspath(output) if output is not None else src
    in_place = os.path.abspath(out) == os.path.abspath(src) or same_file(out, src)
    with _open_single(src) as f:
        old = dict(f.metadata)
        new = dict(old)
        if copy_from is not None:
            with open_weights(copy_from) as other:
                new.update({k: v for k, v in other.metadata.items()
                            if not k.startswith(STALE_PREFIXES) and k not in STALE_KEYS})
        for pattern in deletes:
            hits = [k for k in new if fnmatch.fnmatchcase(k, pattern)]
            if not hits:
                raise UsageError(f"--delete {pattern!r} matches no metadata key.", path=src,
                                 hint="run `lorakit meta FILE` to list the keys.")
            for k in hits:
                del new[k]
        explicit = set()
        for k, v in items:
            new[k] = v
            explicit.add(k)
        ss_changed = any(old.get(k) != new.get(k) for k in set(old) | set(new) if k.startswith("ss_"))
        rehashed: list[str] = []
        had = [k for k in HASH_KEYS if k in old]
        if rehash or (ss_changed and had):
            model_hash, legacy = sshs_hashes_of(f, new)
            wanted = {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
            if rehash and any(k.startswith("modelspec.") for k in (*new, *old)):   # what --check then expects
                wanted["modelspec.hash_sha256"] = "0x" + model_hash
            for k, v in wanted.items():
                if k in explicit or (not rehash and k not in had):
                    continue
                if new.get(k) != v:
                    rehashed.append(k)
                new[k] = v
        if new == old and not in_place and output is None:
            raise UsageError("the edit changes nothing.", path=src)
        if new == old and in_place:
            raise UsageError("the edit changes nothing; the file was left as it was.", path=src)
        entries = [(i.name, i.dtype, i.shape) for i in f.infos.values()]
        mode = stat.S_IMODE(os.stat(src).st_mode)
        inputs = [] if in_place else [src]
        if copy_from is not None and not (in_place and same_file(copy_from, src)):
            inputs.append(os.fspath(copy_from))   # never replace the file the metadata came from
        with SafetensorsWriter(out, entries, new, inputs=inputs) as w:
            for name in w.order:
                w.write(name, f.get(name))
    try:
        os.chmod(out, mode)
    except OSError:
        pass
    changed = sorted(k for k in new if old.get(k) != new[k])
    removed = sorted(k for k in old if k not in new)
    return MetaEdit(src, out, in_place, changed, removed, rehashed, new)


# ---------------------------------------------------------------------------------------------
# Audit: does a LoRA's metadata describe its tensors?
# ---------------------------------------------------------------------------------------------

def _same_number(text: str, want: str) -> bool:
    if text == want:
        return True
    try:
        return float(text) == float(want)
    except ValueError:
        return False


def audit_lora_metadata(path: str | os.PathLike[str]) -> list[str]:
    """Problems with a LoRA's network description and hashes (empty list = consistent).

    Checks ss_network_dim / ss_network_alpha ("Dynamic" when mixed), ss_network_module,
    ss_base_model_version, modelspec.architecture (dev vs schnell vs chroma) and that the stored
    sshs_* / modelspec.hash_sha256 hashes match the tensors as written. The ss_* and modelspec.* keys
    are checked when the file uses that family at all; a file ``--rehash`` just wrote passes.
    """
    p = os.fspath(path)
    problems: list[str] = []
    with open_weights(p) as f:
        meta = f.metadata
        parsed = parse(f)
        ranks: list[int] = []
        alphas: list[float] = []
        families: Counter[str] = Counter()
        for e in parsed.entries:
            families[e.family] += 1
            if e.family == "lora":
                r = e.shapes["down"][0]
                key = e.keys.get("alpha")
                a = entry_alpha(parsed, e, f.first_value(key) if key else None)
                ranks.append(r)
                alphas.append(float(a) if a is not None else float(r))
        model_hash, legacy = sshs_hashes_of(f)
    # a family of keys the file does not use at all (no ss_* training description, no modelspec.*) is not
    # inconsistent: only the keys of a family the file has are checked (hashes always are: --rehash adds them)
    has_ss = any(k.startswith("ss_") for k in meta)
    has_spec = any(k.startswith("modelspec.") for k in meta)
    if ranks and has_ss:
        for key, values in (("ss_network_dim", ranks), ("ss_network_alpha", alphas)):
            want = summarize_values(values)
            got = meta.get(key)
            if got is None:
                problems.append(f"{key} missing (tensors say {want})")
            elif not _same_number(got, want):
                problems.append(f"{key} = {got!r} but the tensors say {want!r}")
    lyco = families["loha"] + families["lokr"]
    stamp = parsed.arch.spec.stamp
    want_module = "lycoris.kohya" if lyco else stamp.kohya_module
    if has_ss and stamp.ss_version and meta.get("ss_network_module") not in (want_module,) + (
            (stamp.kohya_module,) if not lyco and families["full"] else ()):
        problems.append(f"ss_network_module = {meta.get('ss_network_module')!r}, expected {want_module!r}")
    variant = parsed.arch.variant
    want_version = stamp.version(variant)
    if has_ss and want_version and meta.get("ss_base_model_version") != want_version:
        problems.append(f"ss_base_model_version = {meta.get('ss_base_model_version')!r}, expected {want_version!r}")
    arch = meta.get("modelspec.architecture")
    spec_arch = stamp.architecture(variant)
    expected_arch = f"{spec_arch}/lora" if spec_arch else None
    if arch is None:
        if has_spec:
            problems.append("modelspec.architecture missing")
    elif expected_arch and arch != expected_arch:
        problems.append(f"modelspec.architecture = {arch!r}, expected {expected_arch!r} for variant {variant!r}")
    elif not arch.endswith("/lora"):
        problems.append(f"modelspec.architecture = {arch!r} lacks the /lora suffix")
    for key, want in (("sshs_model_hash", model_hash), ("sshs_legacy_hash", legacy),
                      ("modelspec.hash_sha256", "0x" + model_hash)):
        got = meta.get(key)
        if got is None and key.startswith("modelspec.") and not has_spec:
            continue
        if got is None:
            problems.append(f"{key} missing")
        elif got.lower() != want:
            problems.append(f"{key} = {got!r} is stale (the tensors give {want!r})")
    return problems
