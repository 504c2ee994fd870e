"""Faults: SIGKILL while writing or training, a full disk, a read-only output folder, unsafe pickles.

Every fault runs in a real subprocess (the thing that gets killed or limited); the test process only
inspects what is left on disk. Outputs lost must be 0: every output finished before the fault is still
there and readable, nothing exists half-written under a final name, and a rerun completes the job.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import (
    REPO,
    assert_nothing_partial,
    is_root,
    make_tiny_checkpoint,
    medunet_argv,
    permissions_enforceable,
    run_cli,
    run_subprocess,
    segment_argv,
    shared_ct_phantoms,
    temp_files,
    train_command,
    train_env,
)

# A batch writer that behaves like `medunet segment`: skip finished outputs, write each atomically.
_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    from medunet.io import write_nifti, save_checkpoint
    out, n, what = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    for i in range(n):
        final = out / (f"case_{i:03d}.nii.gz" if what == "nifti" else f"ckpt_{i:03d}.pt")
        if final.exists():
            continue
        data = np.random.default_rng(i).normal(size=(128, 128, 64)).astype(np.float32)
        print("start", i, flush=True)
        try:
            if what == "nifti":
                write_nifti(data, np.eye(4), final, dtype=np.float32)
            else:
                import torch
                save_checkpoint({"model": {"w": torch.from_numpy(data)}, "epoch": i}, final)
        except OSError as e:
            print(f"{final}: error: {e.strerror or e}", file=sys.stderr, flush=True)
            sys.exit(1)
        print("done", i, flush=True)
""")


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _writer_cmd(out: Path, n: int, what: str) -> list[str]:
    return [sys.executable, "-c", _WRITER, str(out), str(n), what]


@pytest.mark.parametrize("what", ["checkpoint"])  # NIfTI: the medunet segment tests below
def test_sigkill_while_writing_loses_nothing(what, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(_writer_cmd(out, 4, what), stdout=subprocess.PIPE, text=True, cwd=REPO)
    caught: list[Path] = []
    try:
        for line in proc.stdout:
            if line.strip() == "start 2":
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not caught and proc.poll() is None:
                    caught = temp_files(out)
                    time.sleep(0.0005)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert caught, "the kill did not land while a file was being written"
    ext = ".nii.gz" if what == "nifti" else ".pt"
    stem = "case" if what == "nifti" else "ckpt"
    finished = [out / f"{stem}_{i:03d}{ext}" for i in range(4)]
    # the file being written when the kill landed (normally case 2; 3 if the poll was descheduled)
    k = int(caught[0].name.split("_")[1][:3])
    assert k >= 2, caught
    # no half-written file under a final name: the earlier ones complete, the one being written absent
    assert all(p.exists() for p in finished[:k]) and not any(p.exists() for p in finished[k:])
    kept = {p: _sha(p) for p in finished[:k]}
    _check_loads(finished[:k], what)
    # rerun: completes the batch, keeps the finished outputs byte for byte, leaves no temp file
    rerun = subprocess.run(_writer_cmd(out, 4, what), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert not any(f"start {i}\n" in rerun.stdout for i in range(k)), "rerun rewrote finished outputs"
    assert all(_sha(p) == h for p, h in kept.items())
    assert_nothing_partial(out, expected=finished if what == "nifti" else [])
    _check_loads(finished, what)


def _check_loads(paths, what):
    for p in paths:
        if what == "checkpoint":
            obj = torch.load(p, weights_only=True)
            assert obj["model"]["w"].shape == (128, 128, 64)
        else:
            import nibabel as nib

            assert nib.load(str(p)).get_fdata().shape == (128, 128, 64)


@pytest.mark.parametrize("what", ["checkpoint"])  # NIfTI: the medunet segment tests below
def test_disk_full_clear_error_nothing_partial(what, tmp_path):
    """RLIMIT_FSIZE makes every write past 256 KiB fail (EFBIG), as a full disk would (ENOSPC)."""
    out = tmp_path / "out"
    out.mkdir()
    res = run_subprocess(_writer_cmd(out, 2, what), fsize=256 * 1024)
    assert res.code == 1, (res.code, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "too large" in lines[0].lower() and ("case_000" in lines[0] or "ckpt_000" in lines[0]), lines[0]
    assert list(out.iterdir()) == [], f"left behind: {list(out.iterdir())}"


def test_real_full_tmpfs_enospc(tmp_path):
    """The same with a genuinely full filesystem (a 512 KiB tmpfs); needs root with CAP_SYS_ADMIN."""
    if not is_root() or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE variant covers a full disk")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        res = run_subprocess(_writer_cmd(mnt, 2, "nifti"))
        assert res.code == 1 and "Traceback" not in res.stderr, res.stderr
        assert "no space" in res.stderr.lower() and "case_000" in res.stderr, res.stderr
        assert list(mnt.iterdir()) == [], f"left behind on the full disk: {list(mnt.iterdir())}"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("what", ["checkpoint"])  # NIfTI: the medunet segment tests below
def test_read_only_output_folder(what, tmp_path):
    """Writing into a folder the user may not write: clear error naming the file, nothing written."""
    if not permissions_enforceable():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to bite")
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        res = run_subprocess(_writer_cmd(out, 2, what), enforce_permissions=True)
    finally:
        os.chmod(out, 0o755)
    assert res.code == 1, (res.code, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "permission denied" in res.stderr.lower() and ("case_000" in res.stderr or "ckpt_000" in res.stderr)
    assert list(out.iterdir()) == []


def test_checkpoints_written_by_medunet_load_weights_only(tmp_path):
    """save_checkpoint output (model, optimizer, scheduler, counters) loads with weights_only=True."""
    from medunet import networks
    from medunet.io import load_weights, save_checkpoint

    net = networks.create("unet", 3, 1, 3, **networks.get_spec("unet").tiny_options)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    x = torch.randn(1, 1, 16, 16, 16)
    net(x).mean().backward()
    opt.step()
    sched.step()
    path = save_checkpoint({"model": net.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": 3, "rng": torch.get_rng_state()},
                           tmp_path / "ckpt.pt")
    obj = torch.load(path, weights_only=True)
    assert obj["epoch"] == 3 and "state" in obj["optimizer"]
    other = networks.create("unet", 3, 1, 3, **networks.get_spec("unet").tiny_options)
    load_weights(other, path)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert np.isfinite(obj["optimizer"]["param_groups"][0]["lr"])


def test_atomic_outputs_get_normal_permissions(tmp_path):
    """Temp-file writes must not leave outputs 0600 (mkstemp's mode): colleagues must read the labels."""
    from medunet.io import save_checkpoint, write_nifti

    old = os.umask(0o022)
    try:
        a = write_nifti(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "a_seg.nii.gz")
        b = save_checkpoint({"w": torch.zeros(2)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert oct(os.stat(a).st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(b).st_mode & 0o777) == oct(0o644)
    os.chmod(a, 0o640)  # replacing a file keeps the mode its owner chose
    write_nifti(np.ones((4, 4, 4)), np.eye(4), a)
    assert oct(os.stat(a).st_mode & 0o777) == oct(0o640)


# --------------------------------------------------------------------------------------------------
# bundle training: SIGKILL mid-epoch, then the same command again
@pytest.fixture(scope="module")
def ct_phantoms() -> Path:
    return shared_ct_phantoms()


def _history(out: Path) -> list[dict]:
    import csv

    with open(out / "eval" / "history.csv", newline="") as fh:  # without the wall clock (elapsed_s)
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_training_sigkill_mid_epoch_resumes_to_the_same_result(ct_phantoms, tmp_path):
    """Run A straight through 2 epochs; run B is SIGKILLed in epoch 2 and restarted with the same
    command. Both run as subprocesses at the same time (one thread each). B must resume from its epoch-1
    checkpoint and end bit-identical to A: same history (losses, Dice per class), weights, best model."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    log_a, log_b = open(tmp_path / "a.log", "w"), open(tmp_path / "b.log", "w")
    a = subprocess.Popen(train_command(ct_phantoms, straight), cwd=tmp_path, env=train_env(), stdout=log_a, stderr=log_a)
    b = subprocess.Popen(train_command(ct_phantoms, killed), cwd=tmp_path, env=train_env(), stdout=log_b, stderr=log_b)
    latest = killed / "eval" / "checkpoint_latest.pt"
    try:
        deadline = time.monotonic() + 300
        while not latest.exists() and b.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert latest.exists(), (tmp_path / "b.log").read_text(encoding="utf-8")[-3000:]
        time.sleep(0.3)  # into epoch 2's iterations
        b.send_signal(signal.SIGKILL)
        b.wait(60)
        assert a.wait(400) == 0, (tmp_path / "a.log").read_text(encoding="utf-8")[-3000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
        log_a.close()
        log_b.close()
    assert b.returncode == -signal.SIGKILL
    at_kill = torch.load(latest, weights_only=True)["trainer"]["epoch"]
    assert at_kill == 1, f"the kill did not land in epoch 2 (latest checkpoint: epoch {at_kill})"
    assert not temp_files(killed) or all(p.name.startswith(".") for p in temp_files(killed))
    rerun = subprocess.run(train_command(ct_phantoms, killed), cwd=tmp_path, env=train_env(), capture_output=True,
                           text=True, encoding="utf-8", errors="replace", timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr, "restart did not resume from the checkpoint"
    ha, hb = _history(straight), _history(killed)
    assert [r["epoch"] for r in hb] == ["1", "2"]
    assert ha == hb, f"resumed run differs from the uninterrupted one:\n{ha}\n{hb}"
    for name in ("eval/checkpoint_latest.pt", "models/model.pt"):
        sa = torch.load(straight / name, weights_only=True)  # weights_only: no pickled objects anywhere
        sb = torch.load(killed / name, weights_only=True)
        wa, wb = sa.get("model", sa), sb.get("model", sb)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name}: weights differ"
    assert_nothing_partial(killed)


# --------------------------------------------------------------------------------------------------
# medunet segment: SIGKILL while writing, full disk, read-only output folder
@pytest.fixture(scope="module")
def segment_job(tmp_path_factory):
    """Five 48×40×32 CT-like inputs and a tiny checkpoint."""
    import hostile

    d = tmp_path_factory.mktemp("segjob")
    images = [hostile.write_good_image(d / "in" / f"case_{i}.nii.gz", shape=(48, 40, 32), seed=i) for i in range(5)]
    return d / "in", images, make_tiny_checkpoint(d / "model")


def _outputs(out: Path, images) -> dict[Path, list[Path]]:
    from hostile import image_id_of

    return {img: [out / f"{image_id_of(img)}_seg.nii.gz", out / f"{image_id_of(img)}_probabilities.nii.gz"]
            for img in images}


def test_segment_sigkill_while_writing_then_rerun(segment_job, tmp_path):
    """Kill ``medunet segment`` while an output is being written: nothing half-written under a final
    name, finished outputs intact; the same command again completes every output and keeps the
    finished ones byte for byte."""
    folder, images, ckpt = segment_job
    out = tmp_path / "out"
    argv = medunet_argv(*segment_argv([folder], out, ckpt, "--save-probabilities"))
    proc = subprocess.Popen(argv, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    caught = None
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            done = list(out.glob("*_probabilities.nii.gz")) if out.exists() else []
            tmp = temp_files(out) if out.exists() else []
            if done and tmp:  # at least one case finished, another file being written right now
                proc.send_signal(signal.SIGKILL)
                caught = tmp
                break
            time.sleep(0.002)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    if caught is None:
        pytest.fail(f"never caught a write in progress (exit {proc.returncode}); outputs: {sorted(out.iterdir())}")
    assert proc.returncode == -signal.SIGKILL
    expected = _outputs(out, images)
    finished = {}
    for outs in expected.values():
        for p in outs:
            if p.exists():
                assert_nothing_partial(out.parent / "none", expected=[p])  # loads completely
                finished[p] = _sha(p)
    assert finished and len(finished) < 10, sorted(p.name for p in finished)
    rerun = run_subprocess(argv)
    missing = [p.name for outs in expected.values() for p in outs if not p.exists()]
    assert not missing, f"rerun did not complete {missing}\n{rerun.stderr}"
    assert all(_sha(p) == h for p, h in finished.items()), "a finished output was rewritten or damaged"
    assert_nothing_partial(out, expected=[p for outs in expected.values() for p in outs])
    assert rerun.code in (0, 3) and "Traceback" not in rerun.stderr, rerun.stderr  # 0 vs 3: see below


def test_segment_rerun_completes_a_half_finished_case(segment_job, tmp_path):
    """A kill between a case's two writes leaves its label without its probabilities. The same command
    again must write the missing file, and exit 0 since every output exists at the end (nnU-Net's
    ``--continue_prediction``); existing outputs are not failures."""
    folder, images, ckpt = segment_job
    out = tmp_path / "out"
    argv = segment_argv(images[:2], out, ckpt, "--save-probabilities")
    assert run_cli(argv).code == 0
    expected = _outputs(out, images[:2])
    kept = {p: _sha(p) for outs in expected.values() for p in outs}
    half = expected[images[0]][1]
    half.unlink()  # the state a kill between the label and the probabilities leaves
    rerun = run_cli(argv)
    assert half.exists(), f"rerun did not write the missing {half.name}:\n{rerun.stderr}"
    assert all(_sha(p) == h for p, h in kept.items() if p != half)
    assert rerun.code == 0, f"rerun exit {rerun.code}: existing outputs counted as failures\n{rerun.stderr}"


def test_segment_disk_full(segment_job, tmp_path):
    """Every output write fails (RLIMIT_FSIZE 4 KiB, a full disk): exit 1, one clear line per input
    naming its output, no file left."""
    folder, images, ckpt = segment_job
    out = tmp_path / "out"
    res = run_subprocess(medunet_argv(*segment_argv(images[:2], out, ckpt)), fsize=4096)
    assert res.code == 1, (res.code, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    for img in images[:2]:
        lines = [ln for ln in res.stderr.splitlines() if img.name.split(".")[0] in ln and "too large" in ln.lower()]
        assert len(lines) == 1, f"{img.name}: {res.stderr}"
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())


def test_segment_read_only_output_folder(segment_job, tmp_path):
    if not permissions_enforceable():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to bite")
    folder, images, ckpt = segment_job
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        res = run_subprocess(medunet_argv(*segment_argv(images[:2], out, ckpt)), enforce_permissions=True)
    finally:
        os.chmod(out, 0o755)
    assert res.code == 1, (res.code, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "permission denied" in res.stderr.lower() and str(out) in res.stderr, res.stderr
    assert list(out.iterdir()) == []


def test_no_unsafe_deserialisation_anywhere():
    """Static guard over medunet/, scripts/ and the bundle configs: every torch.load passes
    weights_only=True, and nothing calls pickle/dill/joblib loads, np.load(allow_pickle=True) or
    yaml.load without a safe loader."""
    import ast
    import re as _re

    offenders = []
    for path in sorted([*(REPO / "medunet").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
            where = f"{path.relative_to(REPO)}:{node.lineno}: {name}"
            if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
                offenders.append(where)
            elif _re.search(r"(^|\.)(pickle|cPickle|dill|joblib)\.loads?$", name):
                offenders.append(where)
            elif name.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle") == "True":
                offenders.append(where)
            elif name.endswith("yaml.load") and "Safe" not in kwargs.get("Loader", ""):
                offenders.append(where)
    for cfg in sorted((REPO / "bundles").rglob("*.json")):
        for m in _re.finditer(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)", cfg.read_text(encoding="utf-8")):
            offenders.append(f"{cfg.relative_to(REPO)}: {m.group(0)}")
    assert not offenders, "unsafe deserialisation:\n" + "\n".join(offenders)
