"""Every input of a ``medunet segment`` batch stands on its own.

* voxel data that is no image (complex, colour, unsupported types, no voxels) is refused with its
  reason, never converted with data dropped; what converters really write (scaled integers, ``.nii``,
  odd names, singleton axes, gray stored as RGB, blank or one-voxel scans) is segmented;
* an exception of any class while reading, predicting or writing one file fails that file alone;
* every entry of an input folder is segmented or named with its reason;
* outputs that cannot be written are found before anything is predicted, and said in words.

Each failure is one line naming the file, no traceback, and the exit status says some failed.
"""

from __future__ import annotations

import errno
import struct
import zlib
from pathlib import Path

import hostile
import nibabel as nib
import numpy as np
import pytest
from hostile import CONVERTER_CASES, VOXEL_CASES, make_case, write_good_image
from reliability_support import (
    assert_nothing_partial,
    medunet_argv,
    permissions_enforceable,
    run_cli,
    run_subprocess,
    segment_argv,
    traceback_in,
)

from medunet.inference import predictor as predictor_module
from medunet.io import InputError, atomic_write_bytes, read_image
from medunet.io.errors import os_error_words
from medunet.io.image import scalar_voxels, to_float32, voxel_type_problem


def _label_like(label_path: Path, image_path: Path) -> np.ndarray:
    """The label's voxels, after checking it has the image's grid and the model's classes."""
    lab, img = nib.load(str(label_path)), nib.load(str(image_path))
    assert lab.shape == img.shape[:3], (lab.shape, img.shape)
    np.testing.assert_allclose(lab.affine, img.affine, atol=1e-5)
    data = np.asanyarray(lab.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
    return data


def _lines_naming(res, name: str) -> list[str]:
    return [ln for ln in res.lines if name in ln]


def _assert_clean(res) -> None:
    assert not traceback_in(res.stderr) and res.logged_tracebacks == 0, res.stderr
    assert "[Errno" not in res.stderr + res.stdout, res.stderr


# --------------------------------------------------------------------------------------------------
# the voxel-type rule, on the reader
@pytest.mark.parametrize("name", VOXEL_CASES)
def test_reader_refuses_voxels_that_are_no_image(name, tmp_path):
    case = make_case(name, tmp_path / "in" / f"{name}.nii.gz")
    with pytest.raises(InputError) as err:
        read_image(case.path)
    msg = str(err.value)
    assert "\n" not in msg and case.matches(msg), msg


@pytest.mark.parametrize("name", CONVERTER_CASES)
def test_reader_accepts_what_converters_write(name, tmp_path):
    case = make_case(name, tmp_path / "in" / f"{name}.nii.gz")
    img = read_image(case.path)
    assert img.array.dtype == np.float32 and np.all(np.isfinite(img.array))
    assert img.array.ndim == 3
    if "gray" in case.extra:  # gray stored as RGB: the gray itself, exactly
        np.testing.assert_array_equal(img.array, case.extra["gray"])
    if "values" in case.extra:  # scaled storage: the scaled values
        np.testing.assert_allclose(img.array, case.extra["values"], atol=1e-3)


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                   np.int64, np.uint64, np.float16, np.float32, np.float64, np.longdouble])
def test_real_scalar_types_are_images(dtype):
    assert voxel_type_problem(np.dtype(dtype)) is None
    values = np.array([[0, 1], [1, 0]], dtype=dtype)
    out = to_float32(scalar_voxels(values, "x.nii"), "x.nii")
    np.testing.assert_array_equal(out, [[0, 1], [1, 0]])


@pytest.mark.parametrize("dtype, reason", [
    (np.complex64, "complex"), (np.complex128, "complex"), ("U4", "non-numeric"), (object, "non-numeric"),
    ("M8[s]", "non-numeric"), ("V4", "non-numeric"), ([("a", "f4"), ("b", "i2")], "structured"),
    ([("x", "f4"), ("y", "f4")], "structured"),
])
def test_other_types_are_refused_with_the_reason(dtype, reason):
    problem = voxel_type_problem(np.dtype(dtype))
    assert problem is not None and reason in problem, problem
    with pytest.raises(InputError, match=reason):
        scalar_voxels(np.zeros((2, 2), dtype=dtype), "x.nii")


def test_float32_range_is_refused_not_made_infinite():
    with pytest.raises(InputError, match="float32 range"):
        to_float32(np.array([1.0, 1e39]), "x.nii")
    with pytest.raises(InputError, match="NaN/Inf"):
        to_float32(np.array([1.0, np.nan]), "x.nii")
    assert np.isnan(to_float32(np.array([1.0, np.nan]), "x.nii", check_finite=False)[1])


def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)  # (rows, cols[, 2|3|4]) uint8: L, LA, RGB or RGBA
    return path


def test_2d_images_gray_in_colour_read_colour_refused(tmp_path):
    from PIL import Image

    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    ok = {
        "rgb_gray.png": _png(tmp_path / "rgb_gray.png", np.stack([gray] * 3, -1)),
        "rgba_opaque.png": _png(tmp_path / "rgba_opaque.png", np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)),
        "la_opaque.png": _png(tmp_path / "la_opaque.png", np.stack([gray, np.full_like(gray, 255)], -1)),
    }
    pal = Image.frombytes("P", (gray.shape[1], gray.shape[0]), gray.tobytes())
    pal.putpalette(bytes(v for v in range(256) for _ in range(3)))  # index i is the gray (i, i, i)
    pal.save(tmp_path / "palette_gray.png")
    ok["palette_gray.png"] = tmp_path / "palette_gray.png"
    for name, path in ok.items():
        np.testing.assert_array_equal(read_image(path).array, gray.T.astype(np.float32), err_msg=name)
    colour = _png(tmp_path / "colour.png", np.stack([gray, gray[::-1], 255 - gray], -1))
    with pytest.raises(InputError, match="colou?r"):
        read_image(colour)
    alpha = _png(tmp_path / "alpha.png", np.stack([gray] * 3 + [gray[::-1]], -1))
    with pytest.raises(InputError, match="alpha"):
        read_image(alpha)


def test_os_errors_in_words():
    for code in (errno.EEXIST, errno.ENOTDIR, errno.EACCES, errno.EROFS, errno.ENOSPC, errno.ENAMETOOLONG, 9999):
        words = os_error_words(OSError(code, "Some Reason", "/x/.tmp123"))
        assert "Errno" not in words and ".tmp123" not in words and words, words


def test_long_final_name_gets_a_temporary_name_that_fits(tmp_path):
    """A final name just under the 255-byte limit: the atomic write's longer temporary name still fits."""
    final = tmp_path / ("é" * 120 + "_seg.nii.gz")  # 251 bytes
    assert len(final.name.encode()) <= 255
    atomic_write_bytes(final, b"data")
    assert final.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == [final.name]


# --------------------------------------------------------------------------------------------------
# medunet segment, one case at a time and all in one folder
@pytest.mark.parametrize("name", VOXEL_CASES + CONVERTER_CASES)
def test_segment_each_case(name, tmp_path, tiny_checkpoint):
    case = make_case(name, tmp_path / "in" / f"{name}.nii.gz")
    out = tmp_path / "out"
    res = run_cli(segment_argv([case.path], out, tiny_checkpoint))
    _assert_clean(res)
    if case.outcome == "ok":
        assert res.code == 0, res.stderr
        label = _label_like(out / f"{hostile.image_id_of(case.path)}_seg.nii.gz", case.path)
        if case.extra.get("empty_label"):
            assert not label.any(), "a blank scan must give an empty label"
        return
    assert res.code == 1, res.stderr
    named = [ln for ln in res.lines if case.matches(ln)]
    assert len(named) == 1 and len(_lines_naming(res, case.path.name)) == 1, res.stderr
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())


def test_folder_of_every_case_goes_on(tmp_path, tiny_checkpoint):
    """All voxel and converter cases and two good files in one folder: the good and the converter
    files are segmented, each refused file gets one line, exit 3."""
    folder, out = tmp_path / "in", tmp_path / "out"
    cases = [make_case(n, folder / f"{n}.nii.gz") for n in VOXEL_CASES + CONVERTER_CASES]
    good = [write_good_image(folder / f"good_{i}.nii.gz", seed=i) for i in range(2)]
    res = run_cli(segment_argv([folder], out, tiny_checkpoint))
    _assert_clean(res)
    assert res.code == 3, res.stderr
    for case in cases:
        produced = out / f"{hostile.image_id_of(case.path)}_seg.nii.gz"
        if case.outcome == "ok":
            _label_like(produced, case.path)
        else:
            assert not produced.exists(), case.name
            assert len([ln for ln in res.lines if case.matches(ln)]) == 1, f"{case.name}:\n{res.stderr}"
    for g in good:
        _label_like(out / f"{hostile.image_id_of(g)}_seg.nii.gz", g)
    assert_nothing_partial(out)


# --------------------------------------------------------------------------------------------------
# an exception of any class, while reading, predicting or writing one file
_FAULTS = [
    ("read", TypeError("Cannot cast array data from dtype([('R', 'u1')]) to dtype('float32')")),
    ("read", KeyError("dim")),
    ("read", struct.error("unpack requires a buffer of 348 bytes")),
    ("read", zlib.error("Error -3 while decompressing data: invalid block type")),
    ("read", MemoryError()),
    ("read", OSError(errno.EIO, "Input/output error")),
    ("predict", RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")),
    ("predict", MemoryError()),
    ("predict", IndexError("index 3 is out of bounds for dimension 0 with size 3")),
    ("predict", ZeroDivisionError("float division by zero")),
    ("predict", AssertionError()),
    ("write", OSError(errno.ENOSPC, "No space left on device", "/out/.b_seg.123.tmp.nii.gz")),
    ("write", TypeError("Image data has type int64")),
]


@pytest.mark.parametrize("stage, error", _FAULTS, ids=[f"{s}-{type(e).__name__}" for s, e in _FAULTS])
def test_any_exception_fails_that_file_alone(stage, error, tmp_path, tiny_checkpoint, monkeypatch):
    files = [write_good_image(tmp_path / "in" / f"{c}.nii.gz", seed=i) for i, c in enumerate("abc")]
    target = "b.nii.gz"
    where = {"read": "read_image", "predict": None, "write": "write_like"}[stage]
    if where is None:
        original = predictor_module.Predictor.predict_image

        def faulty_predict(self, image, *args, **kwargs):
            if Path(image.path).name == target:
                raise error
            return original(self, image, *args, **kwargs)

        monkeypatch.setattr(predictor_module.Predictor, "predict_image", faulty_predict)
    else:
        original = getattr(predictor_module, where)

        def faulty(*args, **kwargs):
            path = args[0] if where == "read_image" else args[1].path
            if Path(path).name == target:
                raise error
            return original(*args, **kwargs)

        monkeypatch.setattr(predictor_module, where, faulty)
    out = tmp_path / "out"
    res = run_cli(segment_argv(files, out, tiny_checkpoint))
    _assert_clean(res)
    assert res.code == 3, res.stderr
    assert (out / "a_seg.nii.gz").exists() and (out / "c_seg.nii.gz").exists()
    assert not (out / "b_seg.nii.gz").exists()
    lines = _lines_naming(res, target)
    assert len(lines) == 1, res.stderr
    assert {"read": "read", "predict": "predict", "write": "writ"}[stage] in lines[0] or "memory" in lines[0], lines
    assert_nothing_partial(out)


# --------------------------------------------------------------------------------------------------
# every entry of an input folder: segmented, or named with its reason
def test_every_entry_of_an_input_folder_is_segmented_or_named(tmp_path, tiny_checkpoint):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = write_good_image(folder / "a_good.nii.gz")
    (folder / "case.nii.gz").mkdir()  # a folder named like a NIfTI file
    write_good_image(folder / "case.nii.gz" / "inner.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    (folder / "scan.nrrd").write_bytes(b"NRRD0004\n")
    (folder / "noextension").write_bytes(b"\x00" * 64)
    (folder / "broken.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (folder / "broken_link").symlink_to(tmp_path / "gone")
    nested = write_good_image(folder / "nested" / "x.nii.gz")  # a sub-folder of NIfTI files: its files are read
    (folder / "empty_dir").mkdir()
    series = hostile.write_dicom_series(folder / "series", series_uid="1.2.3.4.9")  # a DICOM series: segmented
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._a_good.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    refused = ["case.nii.gz", "notes.txt", "scan.nrrd", "noextension", "broken.nii.gz", "broken_link", "empty_dir"]
    reasons = {"case.nii.gz": "folder", "notes.txt": "extension", "scan.nrrd": "extension",
               "noextension": "extension", "broken.nii.gz": "link", "broken_link": "link", "empty_dir": "empty"}
    res = run_cli(segment_argv([folder], out, tiny_checkpoint))
    _assert_clean(res)
    assert res.code == 3, res.stderr
    _label_like(out / "a_good_seg.nii.gz", good)
    assert nib.load(str(out / "series_seg.nii.gz")).shape == read_image(series).spatial_shape
    _label_like(out / "nested" / "x_seg.nii.gz", nested)  # mirrored into its sub-folder
    for name in refused:
        lines = [ln for ln in res.lines if f"{folder / name}:" in ln]
        assert len(lines) == 1 and "failed" in lines[0], f"{name}:\n{res.stderr}"
        assert reasons[name] in lines[0], lines[0]
    for name in (".DS_Store", "._a_good.nii.gz"):
        lines = [ln for ln in res.lines if f"{folder / name}:" in ln]
        assert len(lines) == 1 and "ignored" in lines[0] and "hidden" in lines[0], f"{name}:\n{res.stderr}"
    assert sorted(p.name for p in out.iterdir()) == ["a_good_seg.nii.gz", "nested", "series_seg.nii.gz"]


def test_hidden_entries_alone_are_no_success(tmp_path, tiny_checkpoint):
    """Ignored entries are not failures, nor successes: a folder with a good file and a hidden one
    exits 0; an input list whose only items fail exits 1."""
    folder = tmp_path / "in"
    write_good_image(folder / "a.nii.gz")
    (folder / ".hidden.nii.gz").write_bytes(b"junk")
    res = run_cli(segment_argv([folder], tmp_path / "out", tiny_checkpoint))
    assert res.code == 0 and len(_lines_naming(res, ".hidden.nii.gz")) == 1, res.stderr
    res = run_cli(segment_argv([folder / "notes.txt"], tmp_path / "out2", tiny_checkpoint))
    assert res.code == 1 and len(_lines_naming(res, "notes.txt")) == 1, res.stderr


def test_unreadable_entries_are_named(tmp_path, tiny_checkpoint):
    """A file and a sub-folder the user may not read (permission bits made to bite for root)."""
    if not permissions_enforceable():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to bite")
    folder, out = tmp_path / "in", tmp_path / "out"
    write_good_image(folder / "a.nii.gz")
    locked = write_good_image(folder / "locked.nii.gz")
    locked_dir = folder / "locked_series"
    hostile.write_dicom_series(locked_dir)
    locked.chmod(0)
    locked_dir.chmod(0)
    try:
        res = run_subprocess(medunet_argv(*segment_argv([folder], out, tiny_checkpoint)), enforce_permissions=True)
    finally:
        locked.chmod(0o644)
        locked_dir.chmod(0o755)
    assert res.code == 3 and not traceback_in(res.stderr), res.stderr
    assert (out / "a_seg.nii.gz").exists()
    for name in ("locked.nii.gz", "locked_series"):
        lines = [ln for ln in res.stderr.splitlines() if f"{folder / name}:" in ln]
        assert len(lines) == 1 and "permission" in lines[0].lower(), f"{name}:\n{res.stderr}"


# --------------------------------------------------------------------------------------------------
# outputs that cannot be written: found before predicting, in words; the other inputs go on
def test_output_folder_is_a_file(tmp_path, tiny_checkpoint, predictions):
    image = write_good_image(tmp_path / "in" / "a.nii.gz")
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, words in ((tmp_path / "taken", "is a file"), (tmp_path / "taken" / "sub", "taken is a file"),
                       (tmp_path / "dangling", "broken symbolic link")):
        res = run_cli(segment_argv([image], out, tiny_checkpoint))
        _assert_clean(res)
        assert res.code == 1, res.stderr
        lines = _lines_naming(res, "a.nii.gz")
        assert len(lines) == 1 and str(out) in lines[0] and words in lines[0], res.stderr
    assert predictions == [], "predicted although the output could not be written"
    assert (tmp_path / "taken").read_text(encoding="utf-8") == "a file"


def test_output_file_that_is_a_folder_fails_that_input_alone(tmp_path, tiny_checkpoint, predictions):
    a = write_good_image(tmp_path / "in" / "a.nii.gz")
    b = write_good_image(tmp_path / "in" / "b.nii.gz", seed=1)
    out = tmp_path / "out"
    (out / "a_seg.nii.gz").mkdir(parents=True)
    for extra in ((), ("--overwrite",)):
        predictions.clear()
        res = run_cli(segment_argv([a, b], out, tiny_checkpoint, *extra))
        _assert_clean(res)
        lines = _lines_naming(res, "a.nii.gz")
        assert len(lines) == 1 and "is a folder" in lines[0], res.stderr
        assert res.code == 3 and (out / "b_seg.nii.gz").is_file(), res.stderr
        assert "a.nii.gz" not in [Path(p).name for p in predictions]
    assert (out / "a_seg.nii.gz").is_dir()


def test_output_name_too_long_fails_before_predicting(tmp_path, tiny_checkpoint, predictions):
    long_stem = "x" * 247  # 247 + ".nii.gz" = 254 bytes: the input fits, "<id>_seg.nii.gz" (258) does not
    long_input = write_good_image(tmp_path / "in" / f"{long_stem}.nii.gz")
    short = write_good_image(tmp_path / "in" / "short.nii.gz")
    res = run_cli(segment_argv([long_input, short], tmp_path / "out", tiny_checkpoint))
    _assert_clean(res)
    assert res.code == 3 and (tmp_path / "out" / "short_seg.nii.gz").exists(), res.stderr
    lines = _lines_naming(res, long_stem)
    assert len(lines) == 1 and ("too long" in lines[0] or "limit" in lines[0]), res.stderr
    assert [Path(p).name for p in predictions] == ["short.nii.gz"]


def test_output_that_would_replace_an_input(tmp_path, tiny_checkpoint, predictions):
    """-o the input folder, which holds ``a.nii.gz`` and a file named like its output: refused (even
    with --overwrite), the input kept byte for byte."""
    folder = tmp_path / "in"
    a = write_good_image(folder / "a.nii.gz")
    clash = write_good_image(folder / "a_seg.nii.gz", seed=3)
    before = clash.read_bytes()
    res = run_cli(segment_argv([a, clash], folder, tiny_checkpoint, "--overwrite"))
    _assert_clean(res)
    lines = _lines_naming(res, f"{a}:")
    assert len(lines) == 1 and "one of the inputs" in lines[0], res.stderr
    assert clash.read_bytes() == before
    assert res.code == 3 and (folder / "a_seg_seg.nii.gz").exists()
    assert [Path(p).name for p in predictions] == ["a_seg.nii.gz"]


def test_read_only_output_folder_found_before_predicting(tmp_path, tiny_checkpoint):
    """Permission bits made to bite for root in a child: one line per input naming the folder, exit 1,
    and (the check comes first) no prediction time spent: far below one prediction per input."""
    if not permissions_enforceable():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to bite")
    images = [write_good_image(tmp_path / "in" / f"c{i}.nii.gz", seed=i) for i in range(2)]
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        res = run_subprocess(medunet_argv(*segment_argv(images, out, tiny_checkpoint)), enforce_permissions=True)
    finally:
        out.chmod(0o755)
    assert res.code == 1 and not traceback_in(res.stderr) and "[Errno" not in res.stderr, res.stderr
    for img in images:
        lines = [ln for ln in res.stderr.splitlines() if img.name in ln]
        assert len(lines) == 1 and "not writable" in lines[0] and "permission denied" in lines[0], res.stderr
    assert " 0.00  failed" in res.stdout, res.stdout  # the summary's seconds: nothing was predicted
    assert list(out.iterdir()) == []


def test_control_characters_in_a_name_keep_messages_on_one_line(tmp_path, tiny_checkpoint):
    """A file name holding a newline and a tab: its error is still one line (the characters escaped),
    and a good file of that kind of name is segmented under its own name."""
    folder, out = tmp_path / "in", tmp_path / "out"
    bad = folder / "bad\nname\t1.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a nifti at all")
    good = write_good_image(folder / "good\nname.nii.gz")
    res = run_cli(segment_argv([folder], out, tiny_checkpoint))
    _assert_clean(res)
    assert res.code == 3, res.stderr
    lines = [ln for ln in res.lines if "bad\\nname\\t1.nii.gz" in ln]
    assert len(lines) == 1 and "failed" in lines[0], res.stderr
    assert not any(ln.startswith(("name", "1.nii")) for ln in res.lines + res.stdout.splitlines())
    _label_like(out / "good\nname_seg.nii.gz", good)
