"""`medunet label-server` against a real MONAI Label server (subprocess on 127.0.0.1, free port).

The server runs in the label environment (``.venv-label``, ``make label``); the test drives it over HTTP
from medunet's environment and with ``monailabel.client.MONAILabelClient`` (run by the label
environment's Python, where monailabel is installed). Studies: small CT phantoms (plus one MRI phantom
when ``bundles/mri`` exists). Bundles: ``bundles/ct`` and ``bundles/mri`` as they are; when the repository
has none yet, a small bundle built the same way (tests/label_bundle.py).

Runs under ``make test-label`` (``pytest -m label``, ``MEDUNET_REQUIRE_LABEL=1``); a plain ``pytest``/``make test``
skips it (it takes minutes). Without ``.venv-label`` it is skipped locally, but fails when
``MEDUNET_REQUIRE_LABEL=1`` (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LABEL_PYTHON = Path(os.environ.get("MEDUNET_LABEL_PYTHON") or REPO / ".venv-label" / "bin" / "python")
START_TIMEOUT_S = 240
TRAIN_TIMEOUT_S = 420

pytestmark = [pytest.mark.label, pytest.mark.slow]


def _require_label_env(config) -> None:
    required = os.environ.get("MEDUNET_REQUIRE_LABEL") == "1"
    if not required and "label" not in (config.option.markexpr or ""):
        # a ~3 min real-server run: `make test-label` (pytest -m label) runs it, `make test` does not
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


def _repo_bundles() -> list[Path]:
    return [p for p in (REPO / "bundles" / "ct", REPO / "bundles" / "mri")
            if (p / "configs" / "inference.json").is_file() and (p / "configs" / "metadata.json").is_file()]


def _snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
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


class Server:
    """A running `medunet label-server` subprocess and what the tests need to talk to it."""

    def __init__(self, root: Path, studies: Path, ref_labels: dict[str, Path], crops: dict[str, Path],
                 models: list[str], proc: subprocess.Popen, url: str, log: Path, start_s: float):
        self.root, self.studies, self.ref_labels, self.crops, self.models = root, studies, ref_labels, crops, models
        self.proc, self.url, self.log, self.start_s = proc, url, log, start_s

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
    import requests

    from medunet.data.phantoms import generate_dataset

    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    data = generate_dataset("ct", root / "ct_phantoms", cases=3, size="small")
    ref_labels, crops = {}, {}
    for img in sorted((data / "imagesTr").glob("*.nii.gz")):
        shutil.copy2(img, studies / img.name)
        ref_labels[img.name[:-7]] = data / "labelsTr" / img.name
        # a crop around the organs, at most one network window: cheap cases for the concurrency and
        # training checks (the full-size phantoms cover geometry)
        crop_id = img.name[:-7] + "_crop"
        crops[crop_id] = _write_crop(img, data / "labelsTr" / img.name, studies / f"{crop_id}.nii.gz",
                                     root / "crop_labels" / f"{crop_id}.nii.gz")
    bundles = _repo_bundles()
    if not bundles:  # the repository's bundles have not landed: a bundle built the same way
        sys.path.insert(0, str(Path(__file__).parent))
        from label_bundle import make_ct_bundle

        bundles = [make_ct_bundle(root / "bundles")]
    models = [b.name for b in bundles]
    if "mri" in models:
        mri = generate_dataset("mri", root / "mri_phantoms", cases=2, size="small")
        img = sorted(mri.glob("images*/*.nii.gz"))[0]
        shutil.copy2(img, studies / img.name)
    # a file next to the studies folder that path-like ids aim at; it must stay untouched
    shutil.copy2(next(iter(studies.glob("*.nii.gz"))), root / "secret.nii.gz")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    cmd = [sys.executable, "-m", "medunet.cli", "label-server", "--studies", str(studies), "--port", str(port),
           "--workdir", str(root / "work")]
    for b in bundles:
        cmd += ["--bundle", str(b)]
    env = {**os.environ, "MEDUNET_CACHE": str(root / "cache"), "MEDUNET_LABEL_PYTHON": str(LABEL_PYTHON)}
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server(root, studies, ref_labels, crops, models, proc, url, log, 0.0)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"label-server exited with {proc.returncode} before serving:\n{srv.log_tail()}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"label-server not ready after {START_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(0.5)
        srv.start_s = time.monotonic() - t0
        print(f"\n[label-server] ready after {srv.start_s:.1f} s (shared 2-core CPU)")
        yield srv
    finally:  # always stop the server and anything it started (training runs in a child process)
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


def _infer(server: Server, model: str, image: str) -> tuple[int, bytes, float]:
    import requests

    t0 = time.monotonic()
    r = requests.post(f"{server.url}/infer/{model}", params={"image": image, "output": "image"}, timeout=300)
    return r.status_code, r.content, time.monotonic() - t0


def _check_label_volume(path: Path, image: Path, labels: set[int]) -> np.ndarray:
    out, ref = nib.load(str(path)), nib.load(str(image))
    assert out.shape[:3] == ref.shape[:3], f"label shape {out.shape} != image shape {ref.shape}"
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4, err_msg="label affine != image affine")
    values = set(np.unique(np.asarray(out.dataobj)).astype(int).tolist())
    assert values <= labels, f"unexpected label values {values - labels}"
    return np.asarray(out.dataobj)


def test_server_binds_loopback_and_says_untrained(server):
    log = server.log.read_text(errors="replace")
    assert "http://127.0.0.1:" in log
    import requests

    info = requests.get(f"{server.url}/info/", timeout=30).json()
    for name in server.models:
        weights = info["models"][name]["weights"]
        if weights == "random-init":
            assert "UNTRAINED" in info["models"][name]["description"]
            assert f"{name!r} has no trained weights" in log and "UNTRAINED" in log


def test_info_lists_medunet_models_with_labels(server):
    info = server.client("print(json.dumps(c.info()))")
    for name in server.models:
        assert name in info["models"], f"{name} missing from /info/: {list(info['models'])}"
        meta = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text()) \
            if (REPO / "bundles" / name).exists() else None
        labels = info["models"][name]["labels"]
        assert labels and "background" not in labels
        if meta is not None:
            channel_def = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
            expected = {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
            assert labels == expected
        assert info["models"][name]["type"] == "segmentation"
        assert name in info["trainers"]


def test_infer_returns_label_in_image_geometry(server):
    image_id = sorted(server.ref_labels)[0]
    status, body, first_s = _infer(server, "ct", image_id)
    assert status == 200, body[:500]
    out = server.root / "infer_ct.nii.gz"
    out.write_bytes(body)
    _check_label_volume(out, server.studies / f"{image_id}.nii.gz", {0, 1, 2, 3})
    status, _, warm_s = _infer(server, "ct", image_id)
    assert status == 200
    print(f"\n[label-server] /infer/ct on a {nib.load(str(out)).shape} CT phantom: first {first_s:.2f} s, "
          f"warm {warm_s:.2f} s (shared 2-core CPU)")
    # the same through MONAILabelClient (multipart response: label file + params)
    crop_id = sorted(server.crops)[0]
    res = server.client(f"f, p = c.infer('ct', {crop_id!r}, {{}})\nprint(json.dumps({{'file': f, 'params': p}}))")
    _check_label_volume(Path(res["file"]), server.studies / f"{crop_id}.nii.gz", {0, 1, 2, 3})
    assert "latencies" in res["params"]
    if "mri" in server.models:
        mri_id = next(p.name[:-7] for p in server.studies.glob("mri_*.nii.gz"))
        status, body, _ = _infer(server, "mri", mri_id)
        assert status == 200, body[:500]
        (server.root / "infer_mri.nii.gz").write_bytes(body)
        mri_labels = server.client("print(json.dumps(c.info()))")["models"]["mri"]["labels"]
        _check_label_volume(server.root / "infer_mri.nii.gz", server.studies / f"{mri_id}.nii.gz",
                            {0, *mri_labels.values()})


def test_submitted_label_is_stored_and_listed(server):
    image_id, second, third = sorted(server.crops)[:3]
    res = server.client(
        f"r = c.save_label({image_id!r}, {str(server.crops[image_id])!r}, tag='final')\n"
        "print(json.dumps({'saved': r, 'ds': c.datastore()}))")
    assert res["saved"]["image"] == image_id
    obj = res["ds"]["objects"][image_id]
    assert "final" in obj["labels"], obj
    stored = server.studies / "labels" / "final" / f"{image_id}.nii.gz"
    assert stored.is_file()
    np.testing.assert_array_equal(np.asarray(nib.load(str(stored)).dataobj),
                                  np.asarray(nib.load(str(server.crops[image_id])).dataobj))
    import requests

    # plain HTTP too: the documented PUT /datastore/label endpoint, then the stats and full views
    with open(server.crops[second], "rb") as fh:
        r = requests.put(f"{server.url}/datastore/label", params={"image": second, "tag": "final"},
                         files={"label": (f"{second}.nii.gz", fh)}, timeout=60)
    assert r.status_code == 200, r.text
    stats = requests.get(f"{server.url}/datastore/", timeout=30).json()
    assert stats["label_tags"].get("final", 0) >= 2 and stats["completed"] >= 2
    full = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in full["objects"][second]["labels"]
    assert not full["objects"][third]["labels"].get("final")
    # a label on another grid (a full-size phantom's label for a crop) is refused; nothing is stored
    with open(server.ref_labels[sorted(server.ref_labels)[0]], "rb") as fh:
        r = requests.put(f"{server.url}/datastore/label", params={"image": third, "tag": "final"},
                         files={"label": (f"{third}.nii.gz", fh)}, timeout=60)
    assert r.status_code == 400 and "does not match" in r.json()["detail"], r.text
    assert not (server.studies / "labels" / "final" / f"{third}.nii.gz").exists()


def test_concurrent_infer_requests_all_succeed(server):
    ids = sorted(server.crops)
    jobs = [ids[i % len(ids)] for i in range(20)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda i: _infer(server, "ct", i), jobs))
    wall = time.monotonic() - t0
    failures = [(i, s, b[:200]) for i, (s, b, _) in zip(jobs, results) if s != 200]
    assert not failures, failures
    for n, (image_id, (_, body, _)) in enumerate(zip(jobs, results)):
        out = server.root / f"concurrent_{n}.nii.gz"
        out.write_bytes(body)
        _check_label_volume(out, server.studies / f"{image_id}.nii.gz", {0, 1, 2, 3})
    print(f"\n[label-server] 20 concurrent /infer/ct: {wall:.1f} s wall (shared 2-core CPU)")


def test_bad_image_ids_get_4xx_and_touch_nothing_outside_studies(server):
    import requests

    outside = _snapshot(server.root, skip=(server.studies, server.root / "work", server.log,
                                           server.root / "client"))
    labels_before = sorted(p.name for p in (server.studies / "labels").rglob("*"))
    secret = server.root / "secret.nii.gz"
    bad_ids = ["no_such_case", "../secret", "../../etc/passwd", str(secret.with_suffix("").with_suffix("")),
               str(secret), "..", "sub/../../secret"]
    for bad in bad_ids:
        r = requests.post(f"{server.url}/infer/ct", params={"image": bad, "output": "image"}, timeout=60)
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text[:300])
        with open(server.ref_labels[sorted(server.ref_labels)[0]], "rb") as fh:
            r = requests.put(f"{server.url}/datastore/label", params={"image": bad, "tag": "final"},
                             files={"label": ("x.nii.gz", fh)}, timeout=60)
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text[:300])
        r = requests.get(f"{server.url}/datastore/image", params={"image": bad}, timeout=60)
        assert 400 <= r.status_code < 500, (bad, r.status_code)
    # a tag that is a path, and a traversal in the URL path itself
    with open(server.ref_labels[sorted(server.ref_labels)[0]], "rb") as fh:
        r = requests.put(f"{server.url}/datastore/label",
                         params={"image": sorted(server.ref_labels)[0], "tag": "../../escaped"},
                         files={"label": ("x.nii.gz", fh)}, timeout=60)
    assert r.status_code == 400, r.text
    r = requests.get(f"{server.url}/datastore/image?image=..%2F..%2Fetc%2Fpasswd", timeout=60)
    assert r.status_code == 400
    assert _snapshot(server.root, skip=(server.studies, server.root / "work", server.log,
                                        server.root / "client")) == outside
    assert sorted(p.name for p in (server.studies / "labels").rglob("*")) == labels_before
    assert not list(server.root.rglob("escaped*")) and not list(server.root.rglob("passwd*"))


def test_train_one_epoch_on_submitted_labels(server):
    import requests

    for image_id in sorted(server.crops)[:2]:  # (re)submit, so this test stands alone
        with open(server.crops[image_id], "rb") as fh:
            r = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "final"},
                             files={"label": (f"{image_id}.nii.gz", fh)}, timeout=60)
        assert r.status_code == 200, r.text
    model = server.root / "work" / "app" / "model" / "ct" / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    t0 = time.monotonic()
    r = requests.post(f"{server.url}/train/ct", json={"max_epochs": 1, "val_split": 0.5}, timeout=60)
    assert r.status_code == 200, r.text
    while True:
        status = requests.get(f"{server.url}/train/", timeout=30).json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() - t0 < TRAIN_TIMEOUT_S, f"training still running after {TRAIN_TIMEOUT_S} s"
        time.sleep(2)
    details = "\n".join(status.get("details", [])[-30:])
    assert status.get("status") == "DONE", f"{status.get('status')}:\n{details}"
    print(f"\n[label-server] 1-epoch fine-tune of ct on 2 labelled crops: {time.monotonic() - t0:.1f} s "
          "(shared CPU)")
    assert model.stat().st_mtime_ns != before, "training did not write models/model.pt"
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["ct"]["weights"] == "fine-tuned"
    assert "UNTRAINED" not in info["models"]["ct"]["description"]
    image_id = sorted(server.crops)[2]  # the infer task reloads the new weights
    status_code, body, _ = _infer(server, "ct", image_id)
    assert status_code == 200
    (server.root / "after_train.nii.gz").write_bytes(body)
    _check_label_volume(server.root / "after_train.nii.gz", server.studies / f"{image_id}.nii.gz", {0, 1, 2, 3})
