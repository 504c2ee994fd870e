"""Hostile inputs (tests/hostile.py) against every entry point: the readers, checkpoint loading,
``medunet segment``, ``medunet check-dataset``, ``medunet plan`` and bundle training.

For every case: one clear line naming the file and the problem, no traceback without ``--debug``,
the batch goes on with the next file, the exit status says success (0) / partial (3) / failure (1),
and nothing is left half-written.
"""

from __future__ import annotations

import sys

import hostile
import numpy as np
import pytest
import torch
from hostile import CHECKPOINT_CASES, FOLDER_CASES, IMAGE_CASES, LOAD, READ, make_case

from medunet.io import InputError, load_checkpoint, load_weights, read_image

ALL_READ_CASES = [n for n in IMAGE_CASES + FOLDER_CASES]


def _make(name, tmp_path):
    return make_case(name, tmp_path / "in" / f"{name}.nii.gz", None)


# --------------------------------------------------------------------------------------------------
# readers
@pytest.mark.parametrize("name", ALL_READ_CASES)
def test_read_image_refuses_or_keeps_geometry(name, tmp_path):
    case = _make(name, tmp_path)
    if READ not in case.applies:
        pytest.skip(f"{name}: a valid file for the reader; judged by the commands that expect 3D/1 channel")
    if case.unprivileged and hostile.is_root():
        pytest.skip("running as root: permission bits do not bite; test_unreadable_file_as_nobody covers it")
    try:
        img = read_image(case.path)
    except InputError as e:
        msg = str(e)
        assert "\n" not in msg
        assert case.matches(msg), f"{name}: error does not name {case.culprit.name} and the problem: {msg}"
        return
    assert case.outcome == "either", f"{name}: read_image accepted a bad input ({img.array.shape})"
    # accepted: the geometry must be the file's (sform as nibabel reads it), finite and non-singular
    assert np.all(np.isfinite(img.affine)) and abs(np.linalg.det(img.affine[:3, :3])) > 0
    assert np.all(np.isfinite(img.array))


def test_huge_header_refused_before_allocation(tmp_path):
    """The memory-budget check reads only the header: 128 GiB claimed, refused in milliseconds."""
    import resource

    case = _make("huge_volume", tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match="too large"):
        read_image(case.path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000, f"peak memory grew by {grown_kib} KiB while refusing a header-only volume"


# --------------------------------------------------------------------------------------------------
# checkpoints
@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_checkpoint_refused(name, tmp_path):
    from medunet import networks

    net = networks.create("unet", 3, 1, 3, **networks.get_spec("unet").tiny_options)
    case = make_case(name, tmp_path / "ckpt" / f"{name}.pt")
    assert LOAD in case.applies
    with pytest.raises(InputError) as err:
        load_weights(net, case.path)
    assert case.matches(str(err.value)), str(err.value)
    if case.marker is not None:
        assert not case.marker.exists(), "loading the checkpoint executed code from the pickle"


def test_malicious_pickle_is_really_malicious(tmp_path):
    """Guard against a test that cannot fail: without weights_only the trap fires."""
    case = make_case("checkpoint_malicious_pickle", tmp_path / "evil.pt")
    with pytest.raises(InputError):
        load_checkpoint(case.path)
    assert not case.marker.exists()
    torch.load(case.path, weights_only=False)  # what an unsafe loader would do
    assert case.marker.exists()


def test_at_least_25_distinct_cases():
    assert len(hostile.CASES) >= 25, sorted(hostile.CASES)


def test_unreadable_file_with_permissions_enforced(tmp_path):
    """chmod 000: as root the test drops CAP_DAC_OVERRIDE in a child so the bits bite as for a user."""
    from reliability_support import permissions_enforceable, run_subprocess

    if not permissions_enforceable():
        pytest.skip("root without CAP_SETPCAP: cannot make permission bits bite")
    case = _make("unreadable_file", tmp_path)
    code = ("import sys\nfrom medunet.io import read_image, InputError\n"
            "try:\n    read_image(sys.argv[1])\nexcept InputError as e:\n    print(e)\n    sys.exit(1)\n")
    res = run_subprocess([sys.executable, "-c", code, str(case.path)], enforce_permissions=True)
    assert res.code == 1, (res.stdout, res.stderr)
    assert case.matches(res.stdout.strip()), res.stdout
