"""`medunet label-server` against a real MONAI Label server (subprocess on 127.0.0.1, free port).

The server runs in the label environment (``.venv-label``, ``make label``); the test drives it over HTTP
from medunet's environment and with ``monailabel.client.MONAILabelClient`` (run by the label
environment's Python, where monailabel is installed). It serves ``bundles/ct`` with a small network
trained here for ~30 s (so that its uncertainty means something), plus ``bundles/mri`` untrained when
it exists. Studies: three small CT phantoms and one hard case (a tight crop of a fourth phantom, whose
organs are cut by the image border), and one study that is a DICOM series folder (the held-out phantom
written as CT slices); ``--conf infer_queue 4`` so that a burst of requests meets the
admission limit.

Covered: ``/infer`` equals ``medunet segment`` voxel for voxel (times of both printed); a DICOM series
study answers ``?output=dicom_seg`` with a DICOM SEG of that series whose frames are ``medunet segment``'s
label (a NIfTI study asked for one gets 400 naming it; both request times printed); active learning
returns the hard case first; refused uploads (grid, format, classes, unknown id) write nothing and a bad
label put in by hand is left out of training; a burst of concurrent ``/infer`` gets correct labels or a
clear 503 (peak RSS printed); ``/infer`` answers during training; a server killed during training
restarts and serves a model that loads.

Runs under ``make test-label`` (``pytest -m label``, ``MEDUNET_REQUIRE_LABEL=1``); a plain ``pytest``/``make test``
skips it (it takes minutes). Without ``.venv-label`` it is skipped locally, but fails when
``MEDUNET_REQUIRE_LABEL=1`` (CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dicom_support
import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LABEL_PYTHON = Path(os.environ.get("MEDUNET_LABEL_PYTHON") or REPO / ".venv-label" / "bin" / "python")
START_TIMEOUT_S = 240
TRAIN_TIMEOUT_S = 420
INFER_QUEUE = 4
CT_LABELS = {0, 1, 2, 3}
HARD = "ct_003_crop"
DICOM_STUDY = "ct_dicom_series"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: a small CT network for the served checkpoint (trained by the fixture)
TINY_CT = {"patch_size": [32, 32, 16], "batch_size": 2,
           "network": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]}}

pytestmark = [pytest.mark.label, pytest.mark.slow]


def _require_label_env(config) -> None:
    required = os.environ.get("MEDUNET_REQUIRE_LABEL") == "1"
    if not required and "label" not in (config.option.markexpr or ""):
        # a few-minute real-server run: `make test-label` (pytest -m label) runs it, `make test` does not
        pytest.skip("real MONAI Label server test: run `make test-label` (or pytest -m label)")
    if LABEL_PYTHON.exists():
        return
    reason = f"MONAI Label environment not found at {LABEL_PYTHON}: run `make label` to create .venv-label"
    if required:
        pytest.fail(f"{reason} (MEDUNET_REQUIRE_LABEL=1: CI must run this test)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if any(p == s or s in p.parents for s in skip):
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _write_crop(image: Path, label: Path, image_out: Path, label_out: Path, size=(32, 32, 12)) -> Path:
    """Crop ``image``/``label`` to ``size`` voxels around the label's centre (affine kept exact)."""
    lab = nib.load(str(label))
    fg = np.argwhere(np.asarray(lab.dataobj) > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.array(lab.shape[:3]) // 2
    lo = [int(min(max(c - s // 2, 0), max(n - s, 0))) for c, s, n in zip(centre, size, lab.shape)]
    box = tuple(slice(a, a + s) for a, s in zip(lo, size))
    label_out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.load(str(image)).slicer[box], str(image_out))
    nib.save(lab.slicer[box], str(label_out))
    return label_out


def _train_small_ct(root: Path) -> Path:
    """``medunet train bundles/ct`` for ~30 s with a small network: ``models/model.pt`` + ``plan.json``."""
    out = root / "trained"
    sets = {"num_workers": "0", "mlflow": "false", "progress_bar": "false", "plan_overrides": json.dumps(TINY_CT),
            "n_folds": "4", "phantom_cases": "4", "phantom_size": '"small"', "val_interval": "4",
            "epoch_length": "25"}
    cmd = [sys.executable, "-m", "medunet.cli", "train", str(REPO / "bundles" / "ct"), "--dataset-dir",
           str(root / "train_data"), "--output-dir", str(out / "eval"), "--ckpt-dir", str(out / "models"),
           "--max-epochs", "8"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"training the served CT model failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return out / "models" / "model.pt"


class Server:
    """A running `medunet label-server` subprocess and what the tests need to talk to it (and restart it)."""

    dicom = None  # the DICOM series study (dicom_support.Series)

    def __init__(self, root: Path, studies: Path, ref_labels: dict[str, Path], hard_label: Path, ckpt: Path,
                 models: list[str], cmd: list[str], env: dict, url: str, log: Path):
        self.root, self.studies, self.ref_labels, self.hard_label = root, studies, ref_labels, hard_label
        self.ckpt, self.models, self.cmd, self.env, self.url, self.log = ckpt, models, cmd, env, url, log
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    @property
    def app_model(self) -> Path:
        return self.root / "work" / "app" / "model" / "ct"

    def start(self) -> None:
        import requests

        t0 = time.monotonic()
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.cmd, cwd=self.root, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"label-server exited with {self.proc.returncode} before serving:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"label-server not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - t0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and everything it started (training and scoring run in child processes)."""
        for s, wait in ((sig, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, s)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def peak_rss_mib(self) -> float:
        """Peak resident memory of the server process so far (``VmHWM``)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text(encoding="utf-8")
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        app_log = self.root / "work" / "app" / "logs" / "app.log"
        extra = app_log.read_text(errors="replace").splitlines()[-n:] if app_log.exists() else []
        return "\n".join(lines[-n:] + ["--- app.log ---"] + extra)

    def client(self, script: str) -> dict:
        """Run ``script`` with the label env's Python; ``c`` is a MONAILabelClient; prints one JSON line."""
        code = ("import json, sys\nfrom monailabel.client import MONAILabelClient\n"
                f"c = MONAILabelClient({self.url!r}, tmpdir={str(self.root / 'client')!r})\n" + script)
        (self.root / "client").mkdir(exist_ok=True)
        r = subprocess.run([str(LABEL_PYTHON), "-c", code], capture_output=True, text=True, timeout=300,
                           cwd=self.root)
        assert r.returncode == 0, f"client script failed:\n{r.stderr[-3000:]}"
        return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory, pytestconfig):
    _require_label_env(pytestconfig)
    from medunet.data.phantoms import generate_dataset

    root = tmp_path_factory.mktemp("label")
    ckpt = _train_small_ct(root)
    studies = root / "studies"
    studies.mkdir()
    data = generate_dataset("ct", root / "ct_phantoms", cases=4, size="small", seed=1)
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    ref_labels = {}
    for img in images[:3]:
        shutil.copy2(img, studies / img.name)
        ref_labels[img.name[:-7]] = data / "labelsTr" / img.name
    # the hard case: a tight crop whose organs are cut by the border (ranked first by active learning)
    hard_label = _write_crop(images[3], data / "labelsTr" / images[3].name, studies / f"{HARD}.nii.gz",
                             root / "crop_labels" / f"{HARD}.nii.gz")
    dicom = dicom_support.series_from_nifti(sorted((data / "imagesTs").glob("*.nii.gz"))[0], studies / DICOM_STUDY)
    bundles = [p for p in (REPO / "bundles" / "ct", REPO / "bundles" / "mri")
               if (p / "configs" / "inference.json").is_file() and (p / "configs" / "metadata.json").is_file()]
    models = [b.name for b in bundles]
    # a file next to the studies folder that path-like ids aim at; it must stay untouched
    shutil.copy2(images[0], root / "secret.nii.gz")

    port = _free_port()
    cmd = [sys.executable, "-m", "medunet.cli", "label-server", "--studies", str(studies), "--port", str(port),
           "--workdir", str(root / "work"), "--checkpoint", f"ct={ckpt}", "--conf", "uncertainty_models", "ct",
           "--conf", "infer_queue", str(INFER_QUEUE)]
    for b in bundles:
        cmd += ["--bundle", str(b)]
    env = {**os.environ, "MEDUNET_CACHE": str(root / "cache"), "MEDUNET_LABEL_PYTHON": str(LABEL_PYTHON)}
    srv = Server(root, studies, ref_labels, hard_label, ckpt, models, cmd, env, f"http://127.0.0.1:{port}",
                 root / "server.log")
    srv.dicom = dicom
    try:
        srv.start()
        print(f"\n[label-server] ready after {srv.start_s:.1f} s (shared 2-core CPU)")
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop()


def _infer(server: Server, model: str, image: str, **params) -> tuple[int, bytes, float]:
    import requests

    t0 = time.monotonic()
    r = requests.post(f"{server.url}/infer/{model}", params={"image": image, "output": "image"},
                      data={"params": json.dumps(params)} if params else None, timeout=300)
    return r.status_code, r.content, time.monotonic() - t0


def _put_label(server: Server, image_id: str, path: Path | None = None, body: bytes | None = None,
               name: str | None = None):
    import requests

    content = body if body is not None else Path(path).read_bytes()
    return requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "final"},
                        files={"label": (name or f"{image_id}.nii.gz", content)}, timeout=60)


def _label_array(body: bytes, folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    path = folder / name
    path.write_bytes(body)
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _check_label_volume(path: Path, image: Path, labels: set[int]) -> np.ndarray:
    out, ref = nib.load(str(path)), nib.load(str(image))
    assert out.shape[:3] == ref.shape[:3], f"label shape {out.shape} != image shape {ref.shape}"
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4, err_msg="label affine != image affine")
    values = set(np.unique(np.asarray(out.dataobj)).astype(int).tolist())
    assert values <= labels, f"unexpected label values {values - labels}"
    return np.asarray(out.dataobj)


def _wait_train(server: Server, timeout: float = TRAIN_TIMEOUT_S) -> dict:
    import requests

    t0 = time.monotonic()
    while True:
        status = requests.get(f"{server.url}/train/", timeout=30).json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        assert time.monotonic() - t0 < timeout, f"training still running after {timeout} s"
        time.sleep(1)


def test_server_binds_loopback_and_says_untrained(server):
    log = server.log.read_text(errors="replace")
    assert "http://127.0.0.1:" in log
    import requests

    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["ct"]["weights"] == "checkpoint"
    for name in server.models:
        weights = info["models"][name]["weights"]
        if weights == "random-init":
            assert "UNTRAINED" in info["models"][name]["description"]
            assert f"{name!r} has no trained weights" in log and "UNTRAINED" in log


def test_info_lists_medunet_models_with_labels(server):
    info = server.client("print(json.dumps(c.info()))")
    for name in server.models:
        assert name in info["models"], f"{name} missing from /info/: {list(info['models'])}"
        meta = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text(encoding="utf-8"))
        labels = info["models"][name]["labels"]
        channel_def = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
        assert labels == {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
        assert info["models"][name]["type"] == "segmentation"
        assert name in info["trainers"]
    # --conf uncertainty_models ct: active learning from the CT model only
    assert "uncertainty_ct" in info["strategies"] and "uncertainty_ct" in info["scoring"]
    assert not any(k.startswith("uncertainty_") and k != "uncertainty_ct" for k in info["strategies"])


def test_infer_returns_label_in_image_geometry(server):
    import requests

    image_id = sorted(server.ref_labels)[0]
    status, body, _ = _infer(server, "ct", image_id)
    assert status == 200, body[:500]
    out = server.root / "infer_ct.nii.gz"
    out.write_bytes(body)
    _check_label_volume(out, server.studies / f"{image_id}.nii.gz", CT_LABELS)
    # the same through MONAILabelClient (multipart response: label file + params)
    res = server.client(f"f, p = c.infer('ct', {HARD!r}, {{}})\nprint(json.dumps({{'file': f, 'params': p}}))")
    _check_label_volume(Path(res["file"]), server.studies / f"{HARD}.nii.gz", CT_LABELS)
    assert "latencies" in res["params"]
    if "mri" in server.models:  # an uploaded image (not in the studies folder)
        mri = _mri_phantom(server)
        with open(mri, "rb") as fh:
            r = requests.post(f"{server.url}/infer/mri", params={"output": "image"},
                              files={"file": (mri.name, fh)}, timeout=300)
        assert r.status_code == 200, r.text[:500]
        (server.root / "infer_mri.nii.gz").write_bytes(r.content)
        mri_labels = server.client("print(json.dumps(c.info()))")["models"]["mri"]["labels"]
        _check_label_volume(server.root / "infer_mri.nii.gz", mri, {0, *mri_labels.values()})


def _mri_phantom(server: Server) -> Path:
    """A small MRI phantom outside the studies folder (sent as an upload)."""
    from medunet.data.phantoms import generate_dataset

    folder = server.root / "mri_phantoms"
    if not (folder / "dataset.json").exists():
        generate_dataset("mri", folder, cases=2, size="small")
    return sorted(folder.glob("images*/*.nii.gz"))[0]


def _segment_seconds(stdout: str, name: str) -> float:
    """The time column of ``medunet segment``'s summary row for file ``name``."""
    row = next(line.split() for line in stdout.splitlines() if line.startswith(name + " "))
    return float(row[2])


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_infer_equals_medunet_segment_voxel_for_voxel(server, tta):
    ids = [sorted(server.ref_labels)[0], HARD]
    files = [server.studies / f"{i}.nii.gz" for i in ids]
    out = server.root / f"segment_{tta}"
    cmd = [sys.executable, "-m", "medunet.cli", "segment", "--no-progress", "-i", *map(str, files), "-o", str(out),
           "--bundle", str(REPO / "bundles" / "ct"), "--checkpoint", str(server.ckpt), "--device", "cpu"]
    t0 = time.monotonic()
    r = subprocess.run(cmd + (["--tta"] if tta else []), capture_output=True, text=True, timeout=300)
    segment_wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    params = {"tta": True} if tta else {}
    for image_id, file in zip(ids, files):
        _infer(server, "ct", image_id, **params)  # warm (weights loaded, caches filled)
        status, body, infer_s = _infer(server, "ct", image_id, **params)
        assert status == 200, body[:300]
        served, served_affine = _label_array(body, server.root, f"served_{image_id}_{tta}.nii.gz")
        segmented = nib.load(str(out / f"{image_id}_seg.nii.gz"))
        np.testing.assert_array_equal(served, np.asarray(segmented.dataobj))
        np.testing.assert_array_equal(served_affine, segmented.affine)
        print(f"\n[label-server] {image_id} {nib.load(str(file)).shape}{' TTA' if tta else ''}: /infer {infer_s:.2f} s "
              f"round trip, medunet segment {_segment_seconds(r.stdout, file.name):.2f} s for the file "
              f"({segment_wall:.1f} s for the process with start-up, both files); identical labels")
    if "mri" in server.models:  # the MRI plan mirrors every axis: --tta is 8 predictions (CT's mirrors none)
        import requests

        mri = _mri_phantom(server)
        weights = server.root / "work" / "app" / "model" / "mri" / "models" / "model.pt"
        out = server.root / f"segment_mri_{tta}"
        r = subprocess.run([*cmd[:cmd.index("-i")], "-i", str(mri), "-o", str(out), "--bundle",
                            str(REPO / "bundles" / "mri"), "--checkpoint", str(weights), "--device", "cpu"]
                           + (["--tta"] if tta else []), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        t0 = time.monotonic()
        with open(mri, "rb") as fh:
            answer = requests.post(f"{server.url}/infer/mri", params={"output": "image"}, files={"file": (mri.name, fh)},
                                   data={"params": json.dumps(params)}, timeout=300)
        assert answer.status_code == 200, answer.text[:300]
        served, _ = _label_array(answer.content, server.root, f"served_mri_{tta}.nii.gz")
        np.testing.assert_array_equal(served, np.asarray(nib.load(str(out / mri.name.replace(".nii.gz", "_seg.nii.gz"))).dataobj))
        print(f"[label-server] mri upload {served.shape}{' TTA' if tta else ''}: /infer {time.monotonic() - t0:.2f} s, "
              f"medunet segment {_segment_seconds(r.stdout, mri.name):.2f} s for the file; identical labels")


def _dicom_seg_frames(seg, uids: list[str], number: int) -> np.ndarray:
    """Segment ``number`` of a DICOM SEG as an ``(X, Y, Z)`` mask, Z in the order of the source ``uids``."""
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number])
    return np.transpose(np.asarray(frames)[..., 0], (2, 1, 0)).astype(bool)  # (slice, row, column) → (X, Y, Z)


def test_infer_answers_dicom_seg_for_a_dicom_series_study(server):
    import highdicom as hd
    import pydicom
    import requests

    from medunet.io import read_image

    series = server.dicom
    out = server.root / "segment_dicom"
    r = subprocess.run([sys.executable, "-m", "medunet.cli", "segment", "--no-progress", "-i", str(series.folder),
                        "-o", str(out), "--bundle", str(REPO / "bundles" / "ct"), "--checkpoint", str(server.ckpt),
                        "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (segmented_file,) = out.glob("*.nii.gz")
    segmented = np.asarray(nib.load(str(segmented_file)).dataobj)
    assert set(np.unique(segmented).tolist()) - {0}, "medunet segment found no organ: nothing to compare"

    _infer(server, "ct", DICOM_STUDY)  # warm
    status, body, nifti_s = _infer(server, "ct", DICOM_STUDY)  # no format asked: the NIfTI label, as before
    assert status == 200, body[:300]
    np.testing.assert_array_equal(_label_array(body, server.root, "served_dicom.nii.gz")[0], segmented)

    t0 = time.monotonic()  # MONAI Label's REST convention for a DICOM SEG answer
    answer = requests.post(f"{server.url}/infer/ct", params={"image": DICOM_STUDY, "output": "dicom_seg"}, timeout=300)
    seg_s = time.monotonic() - t0
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers["content-type"] == "application/dicom"
    (server.root / "served_dicom_seg.dcm").write_bytes(answer.content)
    seg = hd.seg.segread(server.root / "served_dicom_seg.dcm")
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == series.study and seg.FrameOfReferenceUID == series.frame_of_reference
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.series
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(series.sop_instances)
    numbers = sorted(int(s.SegmentNumber) for s in seg.SegmentSequence)
    assert numbers == sorted(CT_LABELS - {0})
    # every segment, slice by slice of the source series, is medunet segment's label of that class
    image = read_image(series.folder)
    assert image.spatial_shape == segmented.shape
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in image.meta["files"]]
    for number in numbers:
        np.testing.assert_array_equal(_dicom_seg_frames(seg, uids, number), segmented == number)

    # the same through the request parameter (for clients that send only params)
    t0 = time.monotonic()
    r = requests.post(f"{server.url}/infer/ct", params={"image": DICOM_STUDY, "output": "image"},
                      data={"params": json.dumps({"output_format": "dicom-seg"})}, timeout=300)
    again_s = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text[:300]
    (server.root / "served_dicom_seg_param.dcm").write_bytes(r.content)
    again = hd.seg.segread(server.root / "served_dicom_seg_param.dcm")
    assert again.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series
    np.testing.assert_array_equal(_dicom_seg_frames(again, uids, numbers[0]), segmented == numbers[0])

    # the series folder is never taken from the client: a NIfTI study with a planted path is that study's label
    nifti_id = sorted(server.ref_labels)[0]
    plain = requests.post(f"{server.url}/infer/ct", params={"image": nifti_id, "output": "image"}, timeout=300)
    planted = requests.post(f"{server.url}/infer/ct", params={"image": nifti_id, "output": "image"},
                            data={"params": json.dumps({"medunet_dicom_series": str(series.folder)})}, timeout=300)
    assert plain.status_code == planted.status_code == 200, planted.text[:300]
    np.testing.assert_array_equal(_label_array(planted.content, server.root, "planted.nii.gz")[0],
                                  _label_array(plain.content, server.root, "plain.nii.gz")[0])

    # a NIfTI study cannot have one: 400 naming the study, before any prediction; an unknown format too
    r = requests.post(f"{server.url}/infer/ct", params={"image": nifti_id, "output": "dicom_seg"}, timeout=60)
    assert r.status_code == 400 and nifti_id in r.json()["detail"] and "not a DICOM series" in r.json()["detail"], r.text
    r = requests.post(f"{server.url}/infer/ct", params={"image": DICOM_STUDY, "output": "image"},
                      data={"params": json.dumps({"output_format": "png"})}, timeout=60)
    assert r.status_code == 400 and "nifti, dicom-seg" in r.json()["detail"], r.text
    print(f"\n[label-server] DICOM series study {image.spatial_shape}: /infer NIfTI {nifti_s:.2f} s, DICOM SEG "
          f"{seg_s:.2f} s round trip ({len(answer.content) / 1024:.0f} KiB; first SEG of the server), again "
          f"{again_s:.2f} s; SEG frames = medunet segment's label")


def test_active_learning_returns_the_hard_case_first(server):
    import requests

    # the server scores the unlabelled studies in a background process at start-up
    t0 = time.monotonic()
    key = "medunet_uncertainty_ct"
    while True:
        objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        scores = {i: o["image"]["info"].get(key, {}).get("score") for i, o in objects.items()}
        if all(v is not None for v in scores.values()):
            break
        assert time.monotonic() - t0 < 180, f"studies not scored after 180 s: {scores}\n{server.log_tail()}"
        time.sleep(1)
    r = requests.post(f"{server.url}/activelearning/uncertainty_ct", json={}, timeout=60)
    assert r.status_code == 200, r.text
    first = r.json()
    print(f"\n[label-server] uncertainty_ct ranking: {[(i, scores[i]) for i in first['ranking']]}")
    assert first["id"] == HARD and first["ranking"][0] == HARD, (first, scores)
    assert all(scores[HARD] > scores[i] for i in scores if i != HARD)
    assert first["uncertainty_kind"] == "entropy" and first["uncertainty"] == pytest.approx(scores[HARD])
    # a second Next Sample gives another study (the first was just handed out)
    second = requests.post(f"{server.url}/activelearning/uncertainty_ct", json={}, timeout=60).json()
    assert second["id"] != HARD and second["id"] == first["ranking"][1]


def test_submitted_label_is_stored_and_listed(server):
    import requests

    image_id, second, third = sorted(server.ref_labels)
    res = server.client(
        f"r = c.save_label({image_id!r}, {str(server.ref_labels[image_id])!r}, tag='final')\n"
        "print(json.dumps({'saved': r, 'ds': c.datastore()}))")
    assert res["saved"]["image"] == image_id
    assert "final" in res["ds"]["objects"][image_id]["labels"]
    stored = server.studies / "labels" / "final" / f"{image_id}.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(str(stored)).dataobj),
                                  np.asarray(nib.load(str(server.ref_labels[image_id])).dataobj))
    # plain HTTP too: the documented PUT /datastore/label endpoint, then the stats and full views
    r = _put_label(server, second, server.ref_labels[second])
    assert r.status_code == 200, r.text
    stats = requests.get(f"{server.url}/datastore/", timeout=30).json()
    assert stats["label_tags"].get("final", 0) >= 2 and stats["completed"] >= 2
    full = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in full["objects"][second]["labels"]
    assert not full["objects"][third]["labels"].get("final")


def test_bad_uploads_are_refused_with_the_reason_and_write_nothing(server):
    import requests

    target = sorted(server.ref_labels)[2]
    good = nib.load(str(server.ref_labels[target]))
    bad = server.root / "bad_labels"
    bad.mkdir(exist_ok=True)
    shifted = good.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj), shifted), bad / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj).astype(np.uint8) * 0 + 42, good.affine), bad / "values.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj).astype(np.float32) * 0.5, good.affine), bad / "half.nii.gz")
    cases = {  # what is sent → (status, words of the reason)
        "other grid": (dict(path=server.hard_label), 400, "shape"),
        "shifted origin": (dict(path=bad / "shifted.nii.gz"), 400, "origin"),
        "text as .nii.gz": (dict(body=b"not an image at all"), 400, "not a readable NIfTI"),
        "png": (dict(body=b"\x89PNG\r\n\x1a\n" + bytes(64), name="seg.png"), 400, "not a NIfTI file"),
        "classes": (dict(path=bad / "values.nii.gz"), 400, "[42] not declared in the model's classes"),
        "fractions": (dict(path=bad / "half.nii.gz"), 400, "non-integer"),
    }
    before = _snapshot(server.studies, skip=(server.studies / "datastore_v2.json", server.studies / ".lock"))
    for what, (kwargs, status, words) in cases.items():
        r = _put_label(server, target, **kwargs)
        assert r.status_code == status and words in r.json()["detail"], (what, r.status_code, r.text[:300])
        assert "\n" not in r.json()["detail"]
    r = _put_label(server, "no_such_case", server.ref_labels[target])
    assert r.status_code == 404 and "not in the studies folder" in r.json()["detail"], r.text
    assert _snapshot(server.studies, skip=(server.studies / "datastore_v2.json", server.studies / ".lock")) == before
    full = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert not full["objects"][target]["labels"].get("final") and "no_such_case" not in full["objects"]


def test_concurrent_infer_burst_gets_labels_or_a_clear_503(server):
    import requests

    ids = [*sorted(server.ref_labels), HARD]
    reference = {}
    for image_id in ids:  # one at a time first: what every answer of the burst must equal
        status, body, _ = _infer(server, "ct", image_id)
        assert status == 200
        reference[image_id] = _label_array(body, server.root, f"ref_{image_id}.nii.gz")[0]
    jobs = [ids[i % len(ids)] for i in range(24)]

    def call(image_id):
        t = time.monotonic()
        r = requests.post(f"{server.url}/infer/ct", params={"image": image_id, "output": "image"}, timeout=300)
        return r.status_code, r.content, r.headers, time.monotonic() - t

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(call, i) for i in jobs]
        time.sleep(0.3)
        ti = time.monotonic()
        info = requests.get(f"{server.url}/info/", timeout=30)  # the server still answers while it predicts
        info_s = time.monotonic() - ti
        results = [f.result() for f in futures]
    wall = time.monotonic() - t0
    assert info.status_code == 200
    ok = refused = 0
    for n, (image_id, (status, body, headers, _)) in enumerate(zip(jobs, results)):
        if status == 503:
            refused += 1
            assert "server busy" in json.loads(body)["detail"] and headers.get("Retry-After") == "5"
            continue
        assert status == 200, (image_id, status, body[:300])
        ok += 1
        label, _ = _label_array(body, server.root, f"burst_{n}.nii.gz")
        np.testing.assert_array_equal(label, reference[image_id])  # no mixed-up or corrupted result
    assert ok >= 1 + INFER_QUEUE and ok + refused == len(jobs)
    assert refused >= 1, "a burst of 24 should meet the queue limit of 4"
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200 and server.proc.poll() is None
    print(f"\n[label-server] {len(jobs)} concurrent /infer/ct (mixed images): {ok} ok, {refused} x 503 busy, "
          f"{wall:.1f} s wall; /info/ answered in {info_s:.2f} s meanwhile; server peak RSS "
          f"{server.peak_rss_mib():.0f} MiB (shared 2-core CPU)")


def test_bad_image_ids_get_4xx_and_touch_nothing_outside_studies(server):
    import requests

    skip = (server.studies, server.root / "work", server.log, server.root / "client")
    outside = _snapshot(server.root, skip=skip)
    labels_before = sorted(p.name for p in (server.studies / "labels").rglob("*"))
    secret = server.root / "secret.nii.gz"
    bad_ids = ["no_such_case", "../secret", "../../etc/passwd", str(secret.with_suffix("").with_suffix("")),
               str(secret), "..", "sub/../../secret"]
    some_label = server.ref_labels[sorted(server.ref_labels)[0]]
    for bad in bad_ids:
        r = requests.post(f"{server.url}/infer/ct", params={"image": bad, "output": "image"}, timeout=60)
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text[:300])
        r = _put_label(server, bad, some_label, name="x.nii.gz")
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text[:300])
        r = requests.get(f"{server.url}/datastore/image", params={"image": bad}, timeout=60)
        assert 400 <= r.status_code < 500, (bad, r.status_code)
    # a tag that is a path, and a traversal in the URL path itself
    with open(some_label, "rb") as fh:
        r = requests.put(f"{server.url}/datastore/label",
                         params={"image": sorted(server.ref_labels)[0], "tag": "../../escaped"},
                         files={"label": ("x.nii.gz", fh)}, timeout=60)
    assert r.status_code == 400, r.text
    r = requests.get(f"{server.url}/datastore/image?image=..%2F..%2Fetc%2Fpasswd", timeout=60)
    assert r.status_code == 400
    assert _snapshot(server.root, skip=skip) == outside
    assert sorted(p.name for p in (server.studies / "labels").rglob("*")) == labels_before
    assert not list(server.root.rglob("escaped*")) and not list(server.root.rglob("passwd*"))


def test_training_skips_a_bad_label_and_infer_answers_meanwhile(server):
    import requests

    good_ids = sorted(server.ref_labels)[:2]
    for image_id in good_ids:  # (re)submit, so this test stands alone
        assert _put_label(server, image_id, server.ref_labels[image_id]).status_code == 200
    # a label put into the studies folder by hand, on the wrong grid: listed, but never trained on
    bad_id = sorted(server.ref_labels)[2]
    shutil.copy2(server.hard_label, server.studies / "labels" / "final" / f"{bad_id}.nii.gz")
    t0 = time.monotonic()
    while not requests.get(f"{server.url}/datastore/", params={"output": "all"},
                           timeout=30).json()["objects"][bad_id]["labels"].get("final"):
        assert time.monotonic() - t0 < 30, "the datastore did not pick up the hand-placed label"
        time.sleep(0.5)
    model = server.app_model / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    r = requests.post(f"{server.url}/train/ct", json={"max_epochs": 3, "val_split": 0.5}, timeout=60)
    assert r.status_code == 200, r.text
    answered = []
    t0 = time.monotonic()
    while requests.get(f"{server.url}/train/", timeout=30).json().get("status") in ("SUBMITTED", "RUNNING"):
        status, body, seconds = _infer(server, "ct", HARD)  # the last good model answers during training
        assert status == 200, body[:300]
        (server.root / "during_train.nii.gz").write_bytes(body)
        _check_label_volume(server.root / "during_train.nii.gz", server.studies / f"{HARD}.nii.gz", CT_LABELS)
        answered.append(seconds)
        assert time.monotonic() - t0 < TRAIN_TIMEOUT_S
    status = _wait_train(server)
    (server.studies / "labels" / "final" / f"{bad_id}.nii.gz").unlink()
    details = "\n".join(status.get("details", [])[-30:])
    assert status.get("status") == "DONE", f"{status.get('status')}:\n{details}"
    assert answered, "training ended before any /infer could be sent"
    print(f"\n[label-server] 3-epoch fine-tune of ct on 2 labels: {time.monotonic() - t0:.1f} s; {len(answered)} "
          f"/infer answered meanwhile (slowest {max(answered):.2f} s)")
    log = server.log.read_text(errors="replace")
    assert f"training leaves out {bad_id}.nii.gz" in log and "shape" in log
    assert model.stat().st_mtime_ns != before, "training did not write models/model.pt"
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["ct"]["weights"] == "fine-tuned"
    status_code, body, _ = _infer(server, "ct", good_ids[0])  # the infer task reloads the new weights
    assert status_code == 200
    (server.root / "after_train.nii.gz").write_bytes(body)
    _check_label_volume(server.root / "after_train.nii.gz", server.studies / f"{good_ids[0]}.nii.gz", CT_LABELS)


def test_server_killed_during_training_restarts_with_the_last_good_model(server):
    import requests

    from medunet.inference import Predictor

    for image_id in sorted(server.ref_labels)[:2]:
        assert _put_label(server, image_id, server.ref_labels[image_id]).status_code == 200
    model = server.app_model / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    r = requests.post(f"{server.url}/train/ct", json={"max_epochs": 500, "val_split": 0.5}, timeout=60)
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    while model.stat().st_mtime_ns == before:  # kill once training has replaced the model at least once
        state = requests.get(f"{server.url}/train/", timeout=30).json().get("status")
        assert state in ("SUBMITTED", "RUNNING"), f"training ended ({state}) before writing a model"
        assert time.monotonic() - t0 < TRAIN_TIMEOUT_S
        time.sleep(0.2)
    time.sleep(1.0)
    server.stop(signal.SIGKILL)  # the server and its training process, mid-epoch
    leftovers = [p.name for p in model.parent.iterdir() if p.name.startswith(".")]
    server.start()
    print(f"\n[label-server] killed during training, restarted in {server.start_s:.1f} s "
          f"(temporary files left by the kill: {leftovers or 'none'})")
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["ct"]["weights"] == "fine-tuned"
    # what it serves is the complete model file on disk: loaded strictly, as medunet segment would
    expected = Predictor.from_bundle(server.app_model, device="cpu").predict_file(server.studies / f"{HARD}.nii.gz")
    status, body, _ = _infer(server, "ct", HARD)
    assert status == 200, body[:300]
    np.testing.assert_array_equal(_label_array(body, server.root, "after_restart.nii.gz")[0], expected.label)
