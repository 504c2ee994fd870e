"""Prepare and start a MONAI Label server that serves medunet bundles.

This module runs in medunet's own environment (no ``monailabel`` import here). It

1. finds the interpreter of the MONAI Label environment (``.venv-label``, see
   ``scripts/setup_label_env.sh``), because monailabel needs a real torchvision that does not import
   beside medunet's CPU torch wheel;
2. lays out an *app working dir* outside the repository (default
   ``~/.cache/medunet/label-server/<studies-name>-<hash>/``)::

       app/main.py                 two lines: exposes medunet.label.main.MedunetLabelApp
       app/model/<bundle>/         a copy of each bundle (configs, plan, docs; never its eval/ or data/)
       app/model/<bundle>/models/model.pt          weights: --checkpoint, the bundle's own, or random
       app/model/<bundle>/models/medunet-label.json  where those weights came from
       run/                        the server's working directory (empty: no stray .env is read)
       sessions/                   MONAI Label sessions

3. builds the ``python -m monailabel.main start_server`` command line (127.0.0.1 by default,
   ``--conf zoo_source local`` so nothing is fetched from the internet, the medunet ASGI app that
   refuses path-like ids) and starts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medunet.io import InputError
from medunet.io.atomic import atomic_write_text

__all__ = [
    "LabelEnvError", "BundleSetup", "REPO_ROOT", "find_label_python", "default_workdir", "find_bundles",
    "is_remote_studies",
    "parse_checkpoints", "prepare_app", "bundle_labels", "weights_status", "server_command", "server_env", "WEIGHTS_RECORD",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_VENV = REPO_ROOT / ".venv-label"
WEIGHTS_RECORD = "medunet-label.json"
_SKIP_IN_COPY = {"models", "eval", "data", "runs", "mlruns", "__pycache__", ".git", "logs"}
_APP_MAIN = (
    '"""MONAI Label app entry point written by `medunet label-server` (do not edit; rewritten at start)."""\n'
    "from medunet.label.main import MedunetLabelApp  # noqa: F401  (monailabel looks for the subclass)\n"
)


class LabelEnvError(RuntimeError):
    """No Python environment with monailabel + a working torchvision was found."""


@dataclass
class BundleSetup:
    """One bundle as the server will see it."""

    name: str
    source: Path          # the bundle folder given on the command line
    path: Path            # its copy in the app's model folder
    weights: str          # "checkpoint" | "bundle" | "random-init" | "fine-tuned"
    weights_from: str     # file the weights were taken from, or "" for random init
    labels: dict[str, int]

    @property
    def untrained(self) -> bool:
        return self.weights == "random-init"


# --------------------------------------------------------------------------------------------------
# environment
def _imports_monailabel(python: str) -> bool:
    try:
        r = subprocess.run([python, "-c", "import monailabel, torchvision.utils"], capture_output=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_label_python(explicit: str | os.PathLike | None = None) -> str:
    """Interpreter that runs the MONAI Label server.

    Order: ``explicit`` (``--label-python``), ``$MEDUNET_LABEL_PYTHON``, ``<repo>/.venv-label/bin/python``,
    then the current interpreter if ``monailabel`` and ``torchvision.utils`` import there.

    Raises:
        LabelEnvError: none of these exists / works; the message says how to create ``.venv-label``.
    """
    for candidate in (explicit, os.environ.get("MEDUNET_LABEL_PYTHON")):
        if candidate:
            if not Path(candidate).exists():
                raise LabelEnvError(f"{candidate}: label-server Python not found")
            return str(candidate)
    venv_python = LABEL_VENV / "bin" / "python"
    if venv_python.exists():
        return str(venv_python)
    if _imports_monailabel(sys.executable):
        return sys.executable
    raise LabelEnvError(
        f"no MONAI Label environment: {LABEL_VENV} does not exist and monailabel/torchvision do not import "
        "here; run `make label` (scripts/setup_label_env.sh) or set MEDUNET_LABEL_PYTHON")


def is_remote_studies(studies: str | os.PathLike) -> bool:
    """A DICOMweb server URL (``http(s)://.../dicom-web``) instead of a local folder."""
    return str(studies).startswith(("http://", "https://"))


def default_workdir(studies: str | os.PathLike) -> Path:
    """Per-studies-folder app working dir under ``$MEDUNET_CACHE`` (default ``~/.cache/medunet``)."""
    cache = Path(os.environ.get("MEDUNET_CACHE") or Path.home() / ".cache" / "medunet")
    if is_remote_studies(studies):
        key, name = str(studies).rstrip("/"), "dicomweb"
    else:
        resolved = Path(studies).resolve()
        key, name = str(resolved), resolved.name or "studies"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache / "label-server" / f"{name}-{digest}"


# --------------------------------------------------------------------------------------------------
# bundles and weights
def _configs_dir(bundle: Path) -> Path:
    return bundle / "configs"


def _input_dims(bundle: Path) -> int:
    """Spatial dims of the bundle's first input (``metadata.json``), as MONAI Label reads them (default 3)."""
    try:
        meta = json.loads((_configs_dir(bundle) / "metadata.json").read_text(encoding="utf-8"))
        first = next(iter(meta["network_data_format"]["inputs"].values()))
        return len(first.get("spatial_shape") or [0, 0, 0])
    except (OSError, ValueError, KeyError, StopIteration):
        return 3


def find_bundles(paths: Sequence[str | os.PathLike] | None) -> list[Path]:
    """Validate ``--bundle`` folders (default: every 3D ``<repo>/bundles/*`` with an inference config).

    Raises:
        InputError: a folder is missing, has no ``configs/inference.json``/``metadata.json``, or two
            bundles share a folder name (the name is the model id in MONAI Label).
    """
    if paths:
        bundles = [Path(p) for p in paths]
    else:  # the 3D bundles (radiology volumes); a 2D bundle is served only when named with --bundle
        root = REPO_ROOT / "bundles"
        bundles = sorted(p for p in root.glob("*") if (_configs_dir(p) / "inference.json").exists()
                         and _input_dims(p) == 3)
        if not bundles:
            raise InputError(root, "no 3D bundle with configs/inference.json found; pass --bundle DIR")
    seen: dict[str, Path] = {}
    for b in bundles:
        if not b.is_dir():
            raise InputError(b, "bundle folder not found")
        for required in ("inference.json", "metadata.json"):
            if not (_configs_dir(b) / required).is_file():
                raise InputError(b, f"not a MONAI bundle for MONAI Label: configs/{required} is missing")
        name = b.resolve().name
        if name in seen:
            raise InputError(b, f"two bundles are named {name!r} ({seen[name]}); model ids must differ")
        seen[name] = b
    return bundles


def parse_checkpoints(values: Iterable[str] | None, names: Sequence[str]) -> dict[str, Path]:
    """``--checkpoint [NAME=]FILE`` values → ``{bundle name: file}``.

    A bare ``FILE`` is allowed when exactly one bundle is served.
    """
    out: dict[str, Path] = {}
    for value in values or ():
        name, sep, file = value.partition("=")
        if not sep:
            if len(names) != 1:
                raise ValueError(f"--checkpoint {value}: several bundles are served ({', '.join(names)}); "
                                 "write --checkpoint NAME=FILE")
            name, file = names[0], value
        if name not in names:
            raise ValueError(f"--checkpoint {value}: no bundle named {name!r} (served: {', '.join(names)})")
        out[name] = Path(file)
    return out


def bundle_labels(bundle: Path) -> dict[str, int]:
    """Label name → value from ``metadata.json`` (first output's ``channel_def``), background excluded."""
    meta = json.loads((_configs_dir(bundle) / "metadata.json").read_text(encoding="utf-8"))
    outputs = meta.get("network_data_format", {}).get("outputs", {})
    first = next(iter(outputs.values()), {}) if outputs else {}
    return {str(v): int(k) for k, v in first.get("channel_def", {}).items() if str(v).lower() != "background"}


def build_bundle_network(bundle: Path):
    """Instantiate ``network_def`` of ``configs/inference.json`` with ``bundle_root`` = ``bundle``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(_configs_dir(bundle) / "inference.json"))
    parser.config["bundle_root"] = str(bundle)
    try:
        return parser.get_parsed_content("network_def", instantiate=True)
    except Exception as e:  # config errors are long; keep the first line
        first = " ".join(str(e).split())[:300]
        raise InputError(_configs_dir(bundle) / "inference.json", f"cannot build network_def ({first})") from None


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _read_record(bundle_copy: Path) -> dict:
    try:
        return json.loads((bundle_copy / "models" / WEIGHTS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def weights_status(bundle_copy: str | os.PathLike) -> str:
    """Where the served ``models/model.pt`` of an app bundle copy comes from.

    Returns ``"checkpoint"``, ``"bundle"``, ``"random-init"`` (untrained), ``"fine-tuned"`` (the file
    changed since ``medunet label-server`` wrote it, i.e. MONAI Label training replaced it),
    ``"missing"`` or ``"unknown"`` (no record).
    """
    bundle_copy = Path(bundle_copy)
    model = bundle_copy / "models" / "model.pt"
    if not model.exists():
        return "missing"
    record = _read_record(bundle_copy)
    if not record:
        return "unknown"
    if record.get("stamp") != _file_stamp(model):
        return "fine-tuned"
    return str(record.get("weights", "unknown"))


def _set_trained_plan(dest: Path, weights_file: Path | None) -> None:
    """``dest/models/plan.json`` = the plan that goes with ``weights_file``
    (:func:`medunet.inference.resolve_plan`: its ``"plan"`` entry, else ``plan.json`` beside it), or
    none, so that the bundle copy falls back to ``configs/plan.json``."""
    from medunet.inference import resolve_plan

    target = dest / "models" / "plan.json"
    plan = None
    if weights_file is not None:
        try:
            plan = resolve_plan(None, weights_file)
        except InputError:  # no plan of its own (an unreadable file is reported by load_weights)
            plan = None
    if plan is not None:
        plan.save(target)
    elif target.exists():
        target.unlink()


def _started_with(record: dict) -> dict | None:
    """The weights a bundle copy was first served with (``weights``, ``from``, ``from_stamp``): kept
    in the record across fine-tuning, so that a restart knows where its weights came from."""
    if record.get("started_with"):
        return dict(record["started_with"])
    if record.get("weights") and record["weights"] != "fine-tuned":
        return {"weights": record["weights"], "from": record.get("from", ""), "from_stamp": record.get("from_stamp")}
    return None


def _write_weights(src: Path, dest: Path, checkpoint: Path | None) -> tuple[str, str, dict | None]:
    """Put ``models/model.pt`` (raw state dict) into the bundle copy ``dest``; returns (kind, from, the
    weights first served: see :func:`_started_with`).

    Weights are checked against the bundle's ``network_def`` (strict), so a wrong checkpoint fails here
    with the mismatching keys named, not at the first /infer. Weights fine-tuned by the server are
    kept at a restart (with no ``checkpoint``, or the same, unchanged checkpoint file as before) when
    they load; when they do not, the weights the server was started with are served again.
    """
    from medunet.io import load_weights, save_checkpoint

    model = dest / "models" / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    previous = weights_status(dest)
    started = _started_with(_read_record(dest))
    bundled = src / "models" / "model.pt"
    same_checkpoint = (checkpoint is not None and started is not None and started.get("weights") == "checkpoint"
                       and started.get("from") == str(Path(checkpoint).resolve())
                       and started.get("from_stamp") == _file_stamp(Path(checkpoint)))
    if previous == "fine-tuned" and (checkpoint is None or same_checkpoint):  # trained by this server earlier
        problem = _unloadable(dest, model)
        if problem is None:
            return "fine-tuned", str(model), started
        # never serve a file that does not load (e.g. written without an atomic rename by a killed
        # trainer): go back to the weights the server was started with
        logger.warning(f"{model}: the fine-tuned weights do not load ({problem}); serving the weights "
                       f"the server was started with ({(started or {}).get('weights', 'bundle')})")
        first = (started or {}).get("from")
        if checkpoint is None and (started or {}).get("weights") == "checkpoint" and first and Path(first).is_file():
            checkpoint = Path(first)
    if checkpoint is None and not bundled.is_file() and previous == "random-init":
        return "random-init", "", started  # keep the same random weights across restarts
    weights_file = Path(checkpoint) if checkpoint is not None else bundled if bundled.is_file() else None
    _set_trained_plan(dest, weights_file)
    network = build_bundle_network(dest)
    if weights_file is None:
        save_checkpoint(network.state_dict(), model)
        return "random-init", "", {"weights": "random-init", "from": "", "from_stamp": None}
    network = load_weights(network, weights_file)
    save_checkpoint(network.state_dict(), model)
    kind = "checkpoint" if checkpoint is not None else "bundle"
    origin = str(weights_file.resolve())
    return kind, origin, {"weights": kind, "from": origin, "from_stamp": _file_stamp(weights_file)}


def _unloadable(bundle_copy: Path, weights: Path) -> str | None:
    """Why ``weights`` cannot be served from ``bundle_copy`` as the infer task loads them (its plan,
    strict loading), or None when they load."""
    from medunet.inference import resolve_plan
    from medunet.io import load_weights

    try:
        load_weights(resolve_plan(bundle_copy, weights).build_network(), weights)
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be served
        return " ".join(str(e).split())[:300] or type(e).__name__
    return None


def _copy_bundle(src: Path, dest: Path) -> None:
    """Refresh ``dest`` from ``src`` (configs, plan, docs, scripts), keeping ``dest/models``."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dest.iterdir():
        if entry.name == "models":
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in src.iterdir():
        if entry.name in _SKIP_IN_COPY:
            continue
        target = dest / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, target)


def prepare_app(workdir: str | os.PathLike, bundles: Sequence[Path],
                checkpoints: Mapping[str, Path] | None = None) -> list[BundleSetup]:
    """Lay out the app working dir (see the module docstring) and return what each bundle serves."""
    workdir = Path(workdir)
    app = workdir / "app"
    for sub in ("model", "run", "sessions"):
        (app if sub == "model" else workdir).joinpath(sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(app / "main.py", _APP_MAIN)
    checkpoints = dict(checkpoints or {})
    setups = []
    for src in bundles:
        name = src.resolve().name
        dest = app / "model" / name
        _copy_bundle(src, dest)
        kind, origin, started = _write_weights(src, dest, checkpoints.get(name))
        model = dest / "models" / "model.pt"
        record = {"weights": kind, "from": origin, "bundle": str(src.resolve()), "stamp": _file_stamp(model),
                  "started_with": started}
        atomic_write_text(dest / "models" / WEIGHTS_RECORD, json.dumps(record, indent=2))
        setups.append(BundleSetup(name, src, dest, kind, origin, bundle_labels(dest)))
    return setups


# --------------------------------------------------------------------------------------------------
# the server process
def server_command(python: str, workdir: str | os.PathLike, studies: str | os.PathLike, models: Sequence[str],
                   host: str = "127.0.0.1", port: int = 8000,
                   conf: Mapping[str, str] | None = None) -> list[str]:
    """``python -m monailabel.main start_server ...`` for the app in ``workdir``.

    ``conf`` adds/overrides ``--conf KEY VALUE`` pairs (e.g. ``{"skip_trainers": "true"}``); ``zoo_source``
    is always ``local`` and SAM2 is off (medunet serves only its own bundles).
    """
    settings = {"models": ",".join(models), "preload": "false", "sam2": "false", **dict(conf or {}),
                "zoo_source": "local"}
    cmd = [python, "-m", "monailabel.main", "start_server",
           "--app", str(Path(workdir) / "app"),
           "--studies", str(studies) if is_remote_studies(studies) else str(Path(studies).resolve()),
           "--host", host, "--port", str(int(port)), "--uvicorn_app", "medunet.label.asgi:app"]
    for key, value in settings.items():
        cmd += ["--conf", str(key), str(value)]
    return cmd


def server_env(workdir: str | os.PathLike, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the server: sessions inside ``workdir``, no zoo downloads, unbuffered logs."""
    env = dict(os.environ if base is None else base)
    env["MONAI_LABEL_SESSION_PATH"] = str(Path(workdir) / "sessions")
    env["BUNDLE_DOWNLOAD_SRC"] = "local"
    env["PYTHONUNBUFFERED"] = "1"
    return env
