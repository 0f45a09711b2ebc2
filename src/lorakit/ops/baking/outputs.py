"""Bake outputs: a single file or sharded folder mirroring an input, or a copy of a diffusers pipeline folder;
all written to temporary names and published by rename."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from lorakit.errors import OutputError
from lorakit.io import SafetensorsWriter, WeightFile, check_output_path
from lorakit.io.header import MAX_HEADER_BYTES
from lorakit.io.reader import ShardedFile, check_shard_name, input_files, read_index
from lorakit.io.tempfiles import clean_stale_temps, create_temp_dir
from lorakit.io.writer import fsync_dir
from lorakit.ops.metadata import carry_over


def _publish_folder(tmpdir: str | None, path: str) -> None:
    """Rename a completed temporary output folder into place (replacing only an empty folder: checked before any
    work) and make the rename durable."""
    assert tmpdir is not None
    try:
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmpdir, path)
    except OSError as exc:
        raise OutputError(f"cannot publish the output folder ({exc.strerror}).", path=path) from None
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class FileOutput:
    """Writers for one output that mirrors one input file (same names, same shard assignment)."""

    def __init__(self, src: WeightFile, path: str, codes: dict[str, str], metadata: dict[str, str],
                 inputs: Sequence[str]) -> None:
        self.src, self.path, self.codes = src, path, codes
        self.writers: dict[str, SafetensorsWriter] = {}
        self.tmpdir: str | None = None
        self.extra_files: list[str] = []
        try:
            if isinstance(src, ShardedFile):
                parent = os.path.dirname(os.path.abspath(path))
                clean_stale_temps(parent)
                self.tmpdir = create_temp_dir(parent, os.path.basename(os.path.normpath(path)))
                mask = os.umask(0o022)
                os.umask(mask)
                os.chmod(self.tmpdir, 0o777 & ~mask)     # made 0700; outputs get normal permissions
                for shard in src.shard_names:
                    shard_src = src.shards[shard]
                    meta = {**carry_over(shard_src.metadata), **metadata}
                    entries = [(k, codes[k], i.shape) for k, i in shard_src.infos.items()]
                    shard_out = os.path.join(self.tmpdir, check_shard_name(shard, src.path))
                    self.writers[shard] = SafetensorsWriter(shard_out, entries, meta, inputs=inputs)
            else:
                entries = [(k, codes[k], i.shape) for k, i in src.infos.items()]
                meta = {**carry_over(src.metadata), **metadata}
                self.writers[""] = SafetensorsWriter(path, entries, meta, inputs=inputs)
        except BaseException:
            self.abort()
            raise

    def writer(self, key: str) -> SafetensorsWriter:
        if self.tmpdir is None:
            return self.writers[""]
        return self.writers[self.src.shard_of[key]]  # type: ignore[attr-defined]

    @property
    def size(self) -> int:
        return sum(w.size for w in self.writers.values())

    def commit(self) -> None:
        for w in self.writers.values():
            w.commit()
        if self.tmpdir is None:
            return
        src: ShardedFile = self.src  # type: ignore[assignment]
        index = read_index(src.path)
        meta = dict(index.get("metadata") or {})
        if "total_size" in meta:
            meta["total_size"] = sum(w.size - len(w.header) for w in self.writers.values())
        index["metadata"] = meta
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        if len(text.encode("utf-8")) > MAX_HEADER_BYTES:   # never write an index the reader would refuse
            raise OutputError(f"the output's index would be over the {MAX_HEADER_BYTES}-byte limit lorakit reads.",
                              path=self.path, hint="shorten the input index (e.g. its metadata).")
        with open(os.path.join(self.tmpdir, os.path.basename(src.path)), "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        for name in sorted(os.listdir(src.folder)):
            full = os.path.join(src.folder, name)
            if (name.startswith(".") or not os.path.isfile(full) or name in src.shard_names
                    or name == os.path.basename(src.path) or name.endswith((".safetensors", ".sft", ".index.json"))):
                continue
            shutil.copy2(full, os.path.join(self.tmpdir, name))
            self.extra_files.append(name)
        _publish_folder(self.tmpdir, self.path)
        self.tmpdir = None

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def check_output(path: str, src: WeightFile | None, inputs: Sequence[str]) -> None:
    """``src`` None: the output mirrors a diffusers pipeline folder."""
    if src is None or isinstance(src, ShardedFile):
        if path.endswith((".safetensors", ".sft")):
            what = "a diffusers pipeline folder" if src is None else "a sharded folder"
            raise OutputError(f"the base is {what}, so the output is a folder too.", path=path,
                              hint="give a folder name (it is created; an existing one must be empty).")
        real = os.path.realpath(path)
        for inp in (f for given in inputs for f in input_files(given)):
            r = os.path.realpath(inp)
            if real == r or real == os.path.dirname(r) or r.startswith(real + os.sep) or real.startswith(r + os.sep):
                raise OutputError(f"output folder overlaps input {inp!r}; lorakit never overwrites its inputs.",
                                  path=path, hint="choose another -o folder.")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise OutputError("output folder already exists and is not empty.", path=path,
                              hint="remove it or choose another -o folder.")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError("output's parent folder does not exist or is not writable.", path=path)
    else:
        check_output_path(path, inputs)


class PipelineOutput:
    """A baked copy of a diffusers pipeline folder: the baked component subfolders are written inside a temporary
    folder next to the output, every other file is copied, and the folder is published by one rename."""

    def __init__(self, src: str, path: str) -> None:
        self.src, self.path = src, path
        parent = os.path.dirname(os.path.abspath(path))
        clean_stale_temps(parent)
        self.tmpdir: str | None = create_temp_dir(parent, os.path.basename(os.path.normpath(path)))
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(self.tmpdir, 0o777 & ~mask)
        self.written: dict[str, str] = {}        # subfolder -> weight file written there ("" = a sharded folder)

    def part(self, folder: str, file: WeightFile) -> str:
        """Where the baked copy of subfolder ``folder`` (holding ``file``) is written."""
        assert self.tmpdir is not None
        if isinstance(file, ShardedFile):
            self.written[folder] = ""
            return os.path.join(self.tmpdir, folder)
        os.makedirs(os.path.join(self.tmpdir, folder), exist_ok=True)
        self.written[folder] = os.path.basename(file.path)
        return os.path.join(self.tmpdir, folder, os.path.basename(file.path))

    def commit(self) -> None:
        """Copy what was not baked, then publish (after the parts' own commits)."""
        assert self.tmpdir is not None
        for name in sorted(os.listdir(self.src)):
            src, dst = os.path.join(self.src, name), os.path.join(self.tmpdir, name)
            if name in self.written:
                if self.written[name]:          # a single-file subfolder: its configs next to the baked file
                    for extra in sorted(os.listdir(src)):
                        if extra != self.written[name] and os.path.isfile(os.path.join(src, extra)):
                            shutil.copy2(os.path.join(src, extra), os.path.join(dst, extra))
            elif os.path.isdir(src):
                shutil.copytree(src, dst)     # links followed: an HF-cache snapshot links into its blobs
            else:
                shutil.copy2(src, dst)
        _publish_folder(self.tmpdir, self.path)
        self.tmpdir = None

    def abort(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
