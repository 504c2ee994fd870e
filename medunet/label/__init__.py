"""MONAI Label integration: serve medunet bundles to 3D Slicer / OHIF annotators.

* :mod:`medunet.label.launch` — prepare the app working dir and start the server (medunet's env);
* :mod:`medunet.label.main` — the MONAI Label app (``MedunetLabelApp``; label env only);
* :mod:`medunet.label.asgi` — MONAI Label's FastAPI app with medunet's request checks (label env only);
* :mod:`medunet.label.safety` — id/path checks (pure Python).

Importing this package does not import monailabel.
"""

from medunet.label.launch import (
    BundleSetup,
    LabelEnvError,
    default_workdir,
    find_bundles,
    find_label_python,
    parse_checkpoints,
    prepare_app,
    server_command,
    server_env,
    weights_status,
)

__all__ = [
    "BundleSetup", "LabelEnvError", "default_workdir", "find_bundles", "find_label_python",
    "parse_checkpoints", "prepare_app", "server_command", "server_env", "weights_status",
]
