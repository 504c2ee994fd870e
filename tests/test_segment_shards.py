"""``medunet segment`` over a folder by several processes (``shard``, ``torchrun`` ranks: each case written
exactly once, reruns skip finished cases) and with the next input read while this one is predicted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hostile import write_good_image

from medunet.inference import Predictor
from medunet.inference import predictor as predictor_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five good CT-like volumes and one that cannot be read, in one folder."""
    root = tmp_path_factory.mktemp("cases")
    for i in range(5):
        write_good_image(root / f"case_{i}.nii.gz", seed=i)
    (root / "case_9.nii.gz").write_bytes(b"not a nifti at all")
    return root


def _labels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.glob("*_seg.nii.gz"))}


def test_shards_split_a_folder_so_each_case_is_written_once(tmp_path, folder, tiny_checkpoint, monkeypatch):
    predictor = Predictor.from_bundle(None, tiny_checkpoint, device="cpu", progress=False)
    whole = predictor.segment(folder, tmp_path / "whole")
    written = []
    original = predictor_module.write_like
    monkeypatch.setattr(predictor_module, "write_like", lambda label, image, target, **kw: (
        written.append(Path(target).name), original(label, image, target, **kw))[1])
    shards = [predictor.segment(folder, tmp_path / "split", shard=(rank, 2)) for rank in range(2)]
    names = [[Path(r.input).name for r in results] for results in shards]
    assert names == [["case_0.nii.gz", "case_2.nii.gz", "case_4.nii.gz"], ["case_1.nii.gz", "case_3.nii.gz", "case_9.nii.gz"]]
    assert sorted(written) == [f"case_{i}_seg.nii.gz" for i in range(5)]  # each once, none twice
    assert [r.status for r in shards[1]][-1] == "failed"  # the bad file fails in its own shard
    split, ref = _labels(tmp_path / "split"), _labels(tmp_path / "whole")
    assert split.keys() == ref.keys() and all(np.array_equal(split[k], ref[k]) for k in ref)
    assert sum(r.status == "ok" for r in whole) == 5
    again = predictor.segment(folder, tmp_path / "split", shard=(1, 2))  # a rerun skips finished cases
    assert [r.status for r in again] == ["skipped", "skipped", "failed"]
    with pytest.raises(ValueError, match="rank"):
        predictor.segment(folder, tmp_path / "x", shard=(2, 2))


def test_collisions_are_found_across_shards(tmp_path, tiny_checkpoint):
    a = write_good_image(tmp_path / "p1" / "image.nii.gz", seed=1)
    b = write_good_image(tmp_path / "p2" / "image.nii.gz", seed=2)
    predictor = Predictor.from_bundle(None, tiny_checkpoint, device="cpu", progress=False)
    first = predictor.segment([a, b], tmp_path / "out", shard=(0, 2))
    second = predictor.segment([a, b], tmp_path / "out", shard=(1, 2))
    assert [r.status for r in first] == ["ok"]
    assert [r.status for r in second] == ["failed"] and "collides" in second[0].message and str(a) in second[0].message


def test_prefetch_reads_the_next_input_in_a_thread_and_changes_nothing(tmp_path, folder, tiny_checkpoint,
                                                                       monkeypatch):
    readers: dict[str, str] = {}
    original = predictor_module.read_image

    def recording(path, *args, **kwargs):
        readers[Path(path).name] = threading.current_thread().name
        return original(path, *args, **kwargs)

    monkeypatch.setattr(predictor_module, "read_image", recording)
    predictor = Predictor.from_bundle(None, tiny_checkpoint, device="cpu", progress=False)
    plain = predictor.segment(folder, tmp_path / "plain", prefetch=False)
    assert set(readers.values()) == {threading.current_thread().name}
    readers.clear()
    ahead = predictor.segment(folder, tmp_path / "ahead", prefetch=True)
    assert readers["case_0.nii.gz"] == threading.current_thread().name  # the first: nothing to overlap with
    assert all(readers[f"case_{i}.nii.gz"].startswith("medunet-read") for i in range(1, 5))
    assert [(r.status, r.message.replace("/ahead", "/plain")) for r in ahead] == [(r.status, r.message) for r in plain]
    assert "case_9.nii.gz" in ahead[-1].message and ahead[-1].status == "failed"  # read ahead, failed alone
    p, a = _labels(tmp_path / "plain"), _labels(tmp_path / "ahead")
    assert p.keys() == a.keys() and all(np.array_equal(p[k], a[k]) for k in p)
    readers.clear()
    predictor.segment(folder, tmp_path / "ahead", prefetch=True)  # all done: nothing is read ahead in vain
    assert sorted(readers) == ["case_9.nii.gz"]


def test_repeats_and_the_output_folder_inside_the_input_are_ignored(tmp_path, tiny_checkpoint):
    data = tmp_path / "data"
    for i in range(2):
        write_good_image(data / f"case_{i}.nii.gz", seed=i)
    out = data / "pred"  # the output folder inside the input folder
    predictor = Predictor.from_bundle(None, tiny_checkpoint, device="cpu", progress=False)
    assert [r.status for r in predictor.segment(data, out)] == ["ok", "ok"]
    again = predictor.segment([data, data / "case_0.nii.gz"], out)  # a rerun, one file given twice
    by_status = {r.status: [] for r in again}
    for r in again:
        by_status[r.status].append(r)
    assert sorted(Path(r.input).name for r in by_status["skipped"]) == ["case_0.nii.gz", "case_1.nii.gz"]
    reasons = sorted(r.message.split(": ignored: ")[1] for r in by_status["ignored"])
    assert len(reasons) == 3, reasons  # the two earlier labels in pred/, and the repeated case_0
    assert all(r.startswith("inside the output folder") for r in reasons[:2]), reasons
    assert reasons[2].startswith("the same file as an earlier input"), reasons
    assert "failed" not in by_status and not (out / "pred").exists()  # earlier outputs are never inputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_split_the_folder(tmp_path, tiny_checkpoint):
    """One torchrun launch (the shard bookkeeping and reruns are tested in-process above): the rank whose
    share fails at once must wait for the rank still working, and both exit with the batch's status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    folder, out = tmp_path / "in", tmp_path / "out"
    write_good_image(folder / "a_large.nii.gz", shape=(120, 120, 90), seed=7)  # rank 0: seconds of work
    (folder / "b_bad.nii.gz").write_bytes(b"garbage")  # rank 1: fails at once
    write_good_image(folder / "c_small.nii.gz", seed=8)  # rank 0 again
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--monitor-interval", "0.1", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "medunet.cli", "segment", "-i", str(folder), "-o", str(out), "--checkpoint",
               str(tiny_checkpoint), "--device", "cpu", "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert "[rank 1/2]" in run.stderr and "b_bad.nii.gz" in run.stderr, run.stderr[-3000:]
    assert sorted(_labels(out)) == ["a_large_seg.nii.gz", "c_small_seg.nii.gz"], run.stderr[-3000:]
    tables = [ln for ln in run.stdout.splitlines() if ln.endswith("succeeded")]
    assert sorted(tables) == ["0/1 succeeded", "2/2 succeeded", "all 2 ranks: 2/3 succeeded"], run.stdout
    assert run.returncode != 0  # a failed case: torchrun reports its ranks' status 3 as a failure
