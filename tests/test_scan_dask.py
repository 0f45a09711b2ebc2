"""Distributed scan: the same pure per-file function on a Dask cluster (a local one, started here, in-process and
one worker to stay light) gives records identical to the local run, streamed into the same index and JSONL."""

from __future__ import annotations

import json

import pytest

from test_scan import _payload_pickle, build_library

distributed = pytest.importorskip("distributed")


@pytest.fixture
def small_library(tmp_path) -> str:
    root = tmp_path / "lib"
    build_library(str(root), n=60)
    (root / "b" / "evil.safetensors").write_bytes(_payload_pickle(str(tmp_path / "never")))
    (root / "b" / "junk.safetensors").write_bytes(b"\x10\x00\x00")
    return str(root)


def test_dask_records_identical_to_local(small_library, tmp_path) -> None:
    from lorakit.ops.scan import jsonl_line, scan_library
    local_lines: list[str] = []
    local = scan_library([small_library], index=str(tmp_path / "local.db"),
                         on_record=lambda r: local_lines.append(jsonl_line(r)))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        remote_lines: list[str] = []
        reads: list[str] = []
        remote = scan_library([small_library], index=str(tmp_path / "dask.db"), executor="dask",
                              address=cluster.scheduler_address, on_read=reads.append,
                              on_record=lambda r: remote_lines.append(jsonl_line(r)))
        assert len(reads) == len(local.records) == 65
        assert remote.records == local.records
        assert sorted(remote_lines) == sorted(local_lines)           # streamed in completion order
        assert remote.duplicates == local.duplicates and len(local.duplicates) == 31   # 30 pairs + the big pair
        assert {r["status"] for r in remote.records} == {"ok", "dangerous", "error"}
        # the index it filled serves a local rescan: nothing is read again
        reads.clear()
        again = scan_library([small_library], index=str(tmp_path / "dask.db"), on_read=reads.append)
        assert reads == [] and again.records == local.records
        from lorakit.cli.main import main      # the command line: --executor dask --address, JSONL streamed
        rc = main(["scan", small_library, "--executor", "dask", "--address", cluster.scheduler_address,
                   "--jsonl", str(tmp_path / "cli.jsonl")])
        assert rc == 2
        assert sorted((tmp_path / "cli.jsonl").read_text().splitlines()) == sorted(x.rstrip("\n") for x in local_lines)
    from lorakit.cli.main import main
    assert main(["scan", small_library, "--address", "tcp://127.0.0.1:1"]) == 2      # --address needs dask
    assert not (tmp_path / "never").exists()
    assert json.loads(local_lines[0])["path"].startswith(small_library)
