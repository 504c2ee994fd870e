#!/usr/bin/env bash
# Create .venv-label: the environment the MONAI Label server of `medunet label-server` runs in.
#
# Why a second environment: monailabel imports torchvision at start-up, and PyPI's torchvision does
# not import beside the CPU torch 2.13.0 wheel that .venv pins ("operator torchvision::nms does not
# exist"). The label server is a separate process anyway, so it gets its own venv with a matching,
# real torch/torchvision pair (torch 2.14.1 + torchvision 0.29.1, served from local disk on this
# machine; ~5.5 GB because it is a CUDA-capable build that also runs on the CPU).
#
# monailabel 0.8.5 is installed with --no-deps, because its declared requirements would pull sam2,
# triton, numpy<2 and jsonschema<4 (via pydicom-seg); the dependencies it really needs for a
# server with local bundles are installed explicitly below.
#
# Usage: scripts/setup_label_env.sh [VENV_DIR]      (default: .venv-label next to this repo)
#        PYTHON=python3.11 scripts/setup_label_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
VENV="${1:-.venv-label}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
MONAILABEL_PIN="monailabel==0.8.5"
start=$(date +%s)

say() { echo "setup_label_env: $*"; }

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "need Python 3.11 (torch 2.14.1 wheels on disk are cp311), got %s" % sys.version.split()[0]'

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# pip warns once per package about configured local index folders that do not exist here: drop those lines
pip_install() {
  "${PIP[@]}" install --quiet "$@" 2> >(grep -v -E "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip

# Keep torch/torchvision fixed for every later install step (medunet's `torch>=2.8` is satisfied).
CONSTRAINTS="$VENV/label-constraints.txt"
printf '%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" > "$CONSTRAINTS"

say "installing $TORCH_PIN $TORCHVISION_PIN"
pip_install "$TORCH_PIN" "$TORCHVISION_PIN"

say "installing medunet (editable) and monailabel's runtime dependencies"
pip_install -c "$CONSTRAINTS" -e "$REPO" \
  uvicorn pydantic-settings python-multipart httpx requests-toolbelt \
  schedule timeloop expiringdict expiring_dict cachetools watchdog \
  pynrrd passlib pyjwt bcrypt shapely einops filelock \
  "pydicom==2.4.4" "dicomweb-client==0.59.1" \
  SimpleITK itk girder-client psutil scikit-image

say "installing $MONAILABEL_PIN and pydicom-seg 0.4.1 without their declared dependencies"
pip_install -c "$CONSTRAINTS" --no-deps "$MONAILABEL_PIN" "pydicom-seg==0.4.1"

# Sanity: the real torchvision must import beside torch, and monailabel's server modules must load.
"$PY" - <<'PY'
import torch, torchvision, torchvision.utils  # noqa: F401  (monailabel/transform/post.py needs it)
import monai, monailabel, medunet
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: F401
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: F401
from monailabel.client import MONAILabelClient  # noqa: F401
print(f"setup_label_env: torch {torch.__version__} | torchvision {torchvision.__version__} | "
      f"monai {monai.__version__} | monailabel {monailabel.__version__} | medunet {medunet.__version__}")
PY

# Requirement check (what `pip check` does; pip 26's own check aborts on itk 5.4.7's wheel tag):
# every installed distribution's requirements must be met, except the ones skipped on purpose above
# (monailabel's sam2 / whole-slide / ITK extras and pydicom-seg's old numpy/jsonschema pins).
"$PY" - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, distributions, version
from packaging.requirements import Requirement

SKIPPED_ON_PURPOSE = {"monailabel", "pydicom-seg"}
problems, skipped = [], 0
for dist in distributions():
    name = (dist.metadata["Name"] or "").lower()
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            ok = req.specifier.contains(version(req.name), prereleases=True)
        except PackageNotFoundError:
            ok = False
        if not ok:
            if name in SKIPPED_ON_PURPOSE:
                skipped += 1
            else:
                problems.append(f"{name} requires {req}")
if problems:
    print("setup_label_env: broken requirements:\n  " + "\n  ".join(sorted(set(problems))), file=sys.stderr)
    sys.exit(1)
print(f"setup_label_env: requirements OK ({skipped} requirement(s) of monailabel/pydicom-seg deliberately "
      "not installed)")
PY

touch "$VENV/.installed"
say "done in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) in $VENV"
