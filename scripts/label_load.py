"""Load test of the label server: N concurrent ``POST /infer`` requests with mixed images.

Starts ``medunet label-server`` on a studies folder of CT phantoms (full-size ``small`` phantoms and
crops of them, so the requests differ in size), serving ``bundles/ct`` (its weights, or random ones:
the compute is the same), then sends ``--requests`` requests at once and prints one line per outcome
and a summary: answers that are a correct label (equal to the same image's label predicted alone),
clear 503 refusals, anything else (failures), wall time, and the server's peak resident memory::

    .venv/bin/python scripts/label_load.py --requests 50

With ``--url`` it loads a server that is already running instead (``--pid`` then names its process
for the memory figure). Exit status 0 when every request got a correct label or a 503, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_studies(folder: Path, cases: int, size: str = "small") -> list[str]:
    """``cases`` CT phantoms and a crop of each (ids ``ct_00i`` and ``ct_00i_crop``)."""
    from medunet.data.phantoms import generate_dataset

    data = generate_dataset("ct", folder.parent / "phantoms", cases=cases, size=size, seed=2)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for img in sorted((data / "imagesTr").glob("*.nii.gz")):
        shutil.copy2(img, folder / img.name)
        volume = nib.load(str(img))
        box = tuple(slice(s // 4, s // 4 + max(s // 2, 1)) for s in volume.shape[:3])
        nib.save(volume.slicer[box], str(folder / img.name.replace(".nii.gz", "_crop.nii.gz")))
        ids += [img.name[:-7], img.name[:-7] + "_crop"]
    return ids


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"label-server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"label-server not ready after {timeout:.0f} s")


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` and its children (``VmRSS``), or of ``pid`` alone (``VmHWM``: its peak)."""
    def read(p: int) -> int:
        try:
            text = Path(f"/proc/{p}/status").read_text(encoding="utf-8")
        except OSError:
            return 0
        m = re.search(rf"{field}:\s+(\d+) kB", text)
        return int(m.group(1)) if m else 0

    total = read(pid)
    if field == "VmRSS":
        children = Path(f"/proc/{pid}/task/{pid}/children")
        for child in (children.read_text(encoding="utf-8").split() if children.exists() else []):
            total += read(int(child))
    return total / 1024


def label_of(body: bytes, folder: Path, name: str) -> np.ndarray:
    path = folder / name
    path.write_bytes(body)
    return np.asarray(nib.load(str(path)).dataobj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50, help="concurrent requests (default 50)")
    parser.add_argument("--cases", type=int, default=3, help="phantoms in the studies folder (each also cropped)")
    parser.add_argument("--size", choices=["small", "default"], default="small",
                        help="phantom size: small (48x48x24) or default (full-size CT)")
    parser.add_argument("--no-segment", action="store_true",
                        help="skip timing `medunet segment` on the same files and weights")
    parser.add_argument("--checkpoint", help="CT weights to serve (default: the bundle's, else random)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="extra label-server --conf, e.g. infer_queue 8")
    parser.add_argument("--url", help="load a running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (memory figures)")
    parser.add_argument("--model", default="ct")
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="medunet-load-"))
    proc = None
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
            ids = sorted(requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
        else:
            ids = make_studies(work / "studies", args.cases, args.size)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "medunet.cli", "label-server", "--studies", str(work / "studies"),
                   "--port", str(port), "--workdir", str(work / "app"), "--bundle", str(REPO / "bundles" / "ct"),
                   "--conf", "skip_trainers", "true"]
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            for key, value in args.conf:
                cmd += ["--conf", key, value]
            log = open(work / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
            env = {**os.environ, "MEDUNET_CACHE": str(work / "cache")}
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            pid = proc.pid
        t0 = time.monotonic()
        wait_ready(url, proc)
        print(f"server ready after {time.monotonic() - t0:.1f} s; {len(ids)} studies; model {args.model!r}")
        while time.monotonic() - t0 < 600:  # let the start-up scoring run end: it would skew the timings
            r = requests.get(f"{url}/scoring/", timeout=30)
            if r.status_code != 200 or r.json().get("status") not in ("SUBMITTED", "RUNNING"):
                break
            time.sleep(1)
        print(f"start-up scoring done after {time.monotonic() - t0:.1f} s")

        def infer(image_id: str):
            t = time.monotonic()
            r = requests.post(f"{url}/infer/{args.model}", params={"image": image_id, "output": "image"},
                              timeout=1800)
            return r.status_code, r.content, r.headers.get("Retry-After"), time.monotonic() - t

        reference = {}
        for image_id in ids:  # each image alone first: what every answer must equal
            status, body, _, seconds = infer(image_id)
            if status != 200:
                raise SystemExit(f"{image_id}: a single request failed ({status}: {body[:200]!r})")
            reference[image_id] = label_of(body, work, f"ref_{image_id}.nii.gz")
            print(f"  alone: {image_id} {reference[image_id].shape} {seconds:.2f} s")

        if not args.url and not args.no_segment:  # the same files and weights through `medunet segment`
            weights = work / "app" / "app" / "model" / args.model / "models" / "model.pt"
            files = [work / "studies" / f"{i}.nii.gz" for i in ids]
            cmd = [sys.executable, "-m", "medunet.cli", "segment", "--no-progress", "-i", *map(str, files), "-o",
                   str(work / "segment"), "--bundle", str(REPO / "bundles" / args.model), "--checkpoint",
                   str(weights), "--device", "cpu"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"medunet segment failed: {r.stderr[-500:]}")
            for image_id, file in zip(ids, files):
                row = next(line.split() for line in r.stdout.splitlines() if line.startswith(file.name + " "))
                same = np.array_equal(np.asarray(nib.load(str(work / "segment" / f"{image_id}_seg.nii.gz")).dataobj),
                                      reference[image_id])
                print(f"  medunet segment: {image_id} {row[2]} s; label {'identical to' if same else 'DIFFERS from'} "
                      "/infer's")
                if not same:
                    return 1

        samples: list[float] = []
        stop = threading.Event()

        def sample_memory() -> None:
            while not stop.is_set() and pid:
                samples.append(rss_mib(pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        jobs = [ids[i % len(ids)] for i in range(args.requests)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(infer, jobs))
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()

        outcome: Counter = Counter()
        latencies = []
        for n, (image_id, (status, body, retry_after, seconds)) in enumerate(zip(jobs, results)):
            if status == 200:
                same = np.array_equal(label_of(body, work, f"load_{n}.nii.gz"), reference[image_id])
                outcome["ok" if same else "WRONG LABEL"] += 1
                latencies.append(seconds)
            elif status == 503 and retry_after and "busy" in json.loads(body).get("detail", ""):
                outcome["503 busy"] += 1
            else:
                outcome[f"FAILED {status}"] += 1
                print(f"  request {n} ({image_id}): {status} {body[:200]!r}")
        alive = proc is None or proc.poll() is None
        peak = rss_mib(pid, "VmHWM") if pid else float("nan")
        print(f"{len(jobs)} concurrent requests in {wall:.1f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(outcome.items())))
        if latencies:
            print(f"answered: median {np.median(latencies):.2f} s, slowest {max(latencies):.2f} s")
        print(f"server memory: peak RSS {peak:.0f} MiB (process lifetime), during the burst "
              f"{max(samples, default=float('nan')):.0f} MiB max with child processes; server alive: {alive}")
        bad = sum(v for k, v in outcome.items() if k not in ("ok", "503 busy"))
        return 0 if bad == 0 and alive else 1
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
