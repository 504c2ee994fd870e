"""Exported networks: TorchScript, ONNX and OpenVINO files, and the engines that run them in the
:class:`~medunet.inference.Predictor` (``backend="onnxruntime"`` / ``"openvino"``).

Every export is checked against the eager network on two inputs of different sizes (the training
patch, batch 1, and a larger window, batch 2): the exported graph keeps batch and spatial sizes free,
as tiled inference needs (the window depends on the image). :func:`export_model` refuses to keep a
file whose outputs differ from eager by more than its tolerance.

An engine is a :class:`torch.nn.Module` around the eager network: it runs the exported graph in
``forward`` and keeps the eager network's shape rules (``valid_input_shape``, ``output_shape``), modules
and device, so :class:`~medunet.inference.sliding.TiledInferer` tiles for it exactly as for the eager
network. The packages are optional (``pip install 'medunet[onnx]'`` / ``'medunet[openvino]'``).

OpenVINO exports can be quantised to int8 (NNCF post-training quantisation, ``'medunet[int8]'``) with
windows of real, preprocessed images as calibration data (:func:`calibration_windows`). Their check
reports how far int8 moves the logits and how often the argmax label changes on those windows; the
Dice cost on whole images is the benchmark's to state.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medunet.io.atomic import atomic_path

__all__ = ["FORMATS", "BACKENDS", "export_model", "load_engine", "probe_inputs", "onnx_model", "Engine",
           "OnnxRuntimeEngine", "OpenVINOEngine", "require", "calibration_windows", "calibration_from_images",
           "quantize_openvino"]

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "openvino": ".xml"}
BACKENDS = ("torch", "torch-compile", "onnxruntime", "openvino")
# "auto" (the Predictor's default) picks between torch and openvino per image; see Predictor
_EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "openvino": "openvino", "nncf": "int8"}


def require(package: str):
    """Import an optional package, or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        extra = _EXTRAS.get(package, package)
        raise ImportError(f"{package} is not installed: pip install 'medunet[{extra}]' (or pip install {package})") from e


def probe_inputs(network: torch.nn.Module, patch_size: Sequence[int], in_channels: int,
                 seed: int = 0) -> list[torch.Tensor]:
    """Two check inputs: ``(1, C, *patch)`` and ``(2, C, *larger)``, each a size the network accepts
    (``larger`` is the patch plus about half of it per axis, rounded up to a valid size)."""
    gen = torch.Generator().manual_seed(seed)
    rules = hasattr(network, "valid_input_shape")
    small = [int(p) for p in patch_size]
    large = [p + max(1, p // 2) for p in small]
    if rules:
        small, large = list(network.valid_input_shape(small, "up")), list(network.valid_input_shape(large, "up"))
    return [torch.randn(1, in_channels, *small, generator=gen), torch.randn(2, in_channels, *large, generator=gen)]


def _spatial_dims(x: torch.Tensor) -> int:
    return x.dim() - 2


def onnx_model(network: torch.nn.Module, example: torch.Tensor):
    """The network as an ``onnx.ModelProto`` (torch's dynamo exporter) with batch and spatial sizes
    free; ``example`` (B, C, *S) traces it."""
    require("onnx")
    require("onnxscript")
    axes = {0: "batch", **{2 + a: f"size{a}" for a in range(_spatial_dims(example))}}
    network = network.eval()
    with warnings_quiet():
        program = torch.onnx.export(network, (example,), dynamo=True, dynamic_shapes=(axes,), verbose=False,
                                    external_data=False, report=False)
    return program.model_proto


@contextlib.contextmanager
def warnings_quiet():
    """Silence the exporters' chatter (warnings and progress lines) for the duration."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# --------------------------------------------------------------------------------------------------
class Engine(torch.nn.Module):
    """A network run by another engine: ``forward(x (B, C, *S) float) -> (B, K, *S')`` float32 on the CPU.

    The wrapped eager ``network`` gives the shape rules, modules and device (attribute look-ups fall
    through to it); subclasses implement :meth:`run` on NumPy arrays.
    """

    name = "engine"

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["network"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(self.run(arr), dtype=np.float32))

    def run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime (CPU execution provider) on an ONNX model: a path, bytes, or a ``ModelProto``."""

    name = "onnxruntime"

    def __init__(self, network: torch.nn.Module, model, threads: int | None = None) -> None:
        super().__init__(network)
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = model.SerializeToString() if hasattr(model, "SerializeToString") else (
            model if isinstance(model, bytes) else os.fspath(model))
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVINOEngine(Engine):
    """OpenVINO on the CPU, one compiled model per input shape (static shapes compile to faster code
    than dynamic ones; tiled inference sees one or two shapes per image).

    Args:
        network: the eager network (shape rules; converted when ``model`` is None).
        model: an OpenVINO IR ``.xml`` or ONNX file, an ``openvino.Model``, or None.
        precision: ``"f32"`` or ``"bf16"`` (OpenVINO's inference precision hint; its CPU plugin would
            otherwise choose bf16 by itself on CPUs that have it).
        example: input used to convert ``network`` when ``model`` is None.
    """

    name = "openvino"

    def __init__(self, network: torch.nn.Module, model=None, precision: str = "f32",
                 example: torch.Tensor | None = None, threads: int | None = None) -> None:
        super().__init__(network)
        if precision not in ("f32", "bf16"):
            raise ValueError(f"precision must be 'f32' or 'bf16', got {precision!r}")
        ov = require("openvino")
        self.core = ov.Core()
        if model is None:
            if example is None:
                raise ValueError("converting a network to OpenVINO needs an example input")
            model = cached_openvino_model(network, example, self.core)
        elif isinstance(model, (str, os.PathLike)):
            model = self.core.read_model(os.fspath(model))
        self.model = model
        self.precision = precision
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self._compiled: dict[tuple[int, ...], object] = {}

    def compiled(self, shape: tuple[int, ...]):
        """The model compiled for one input shape (kept for the next call; the oldest of more than four
        shapes is dropped)."""
        if shape not in self._compiled:
            model = self.model.clone()
            model.reshape({model.inputs[0].get_any_name(): list(shape)})
            if len(self._compiled) >= 4:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[shape] = self.core.compile_model(model, "CPU", self.config)
        return self._compiled[shape]

    def run(self, x: np.ndarray) -> np.ndarray:
        compiled = self.compiled(tuple(x.shape))
        return compiled(x)[compiled.outputs[0]]


def openvino_model(network: torch.nn.Module, example: torch.Tensor):
    """The network as an ``openvino.Model`` (OpenVINO's PyTorch front end), batch and spatial sizes free."""
    ov = require("openvino")
    d = _spatial_dims(example)
    shape = ov.PartialShape([-1, int(example.shape[1]), *([-1] * d)])
    with warnings_quiet(), torch.no_grad():
        return ov.convert_model(network.eval(), example_input=example, input=[shape])


def model_cache_dir() -> Path:
    """Where converted networks are kept between runs: ``$MEDUNET_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/medunet`` (``~/.cache/medunet``)."""
    root = os.environ.get("MEDUNET_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medunet"


def network_fingerprint(network: torch.nn.Module, example: torch.Tensor) -> str:
    """A hash of the network's class, weights and buffers and the example's channels and dimensions:
    a converted file belongs to exactly these weights."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(f"{type(network).__module__}.{type(network).__qualname__}|{tuple(example.shape[1:2])}|"
                  f"{example.dim()}".encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_openvino_model(network: torch.nn.Module, example: torch.Tensor, core=None):
    """:func:`openvino_model`, kept as an OpenVINO IR (float32 weights, exactly the converted graph) in
    :func:`model_cache_dir` ``/openvino/<fingerprint>/model.xml`` so the next process reads it instead
    of tracing the network again. The folder appears whole (written aside, then renamed: processes
    converting at once keep one); a cache that cannot be read or written is converted around."""
    ov = require("openvino")
    core = core or ov.Core()
    folder = model_cache_dir() / "openvino"
    target = folder / f"{network_fingerprint(network, example)}-ov{ov.__version__.split('-')[0]}"
    if (target / "model.xml").is_file():
        try:
            return core.read_model(os.fspath(target / "model.xml"))
        except Exception:  # a damaged or foreign file: convert again and replace it
            shutil.rmtree(target, ignore_errors=True)
    model = openvino_model(network, example)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=folder, prefix=".converting-"))
        try:
            ov.save_model(model, os.fspath(staged / "model.xml"), compress_to_fp16=False)
            os.rename(staged, target)  # fails when another process got there first: keep theirs
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
    except OSError:
        pass  # read-only home, full disk: run without the cache
    return model


class _TorchScriptEngine(Engine):
    """A saved TorchScript module (for the export check)."""

    name = "torchscript"

    def __init__(self, network: torch.nn.Module, path: str | os.PathLike) -> None:
        super().__init__(network)
        self.module = torch.jit.load(os.fspath(path), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x.to("cpu", torch.float32)).float()


def load_engine(backend: str, network: torch.nn.Module, patch_size: Sequence[int], in_channels: int,
                model_file: str | os.PathLike | None = None, bf16: bool = False) -> torch.nn.Module:
    """The callable tiled inference runs: the eager network for ``"torch"``, else an :class:`Engine`.

    Args:
        backend: one of :data:`BACKENDS`.
        network: the eager network, weights loaded, on the CPU for other backends.
        patch_size, in_channels: the example input used to convert ``network`` (training patch, channels).
        model_file: an exported file to run instead of converting ``network`` (``.onnx`` for
            onnxruntime; ``.xml`` or ``.onnx`` for openvino). Its outputs are the file's: it must come
            from the same weights.
        bf16: OpenVINO computes in bfloat16 (ONNX Runtime on the CPU computes in float32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return network
    if backend == "torch-compile":  # inductor code for the window shape, made at the first call (slow)
        if model_file is not None:
            raise ValueError("a model file is for --backend onnxruntime or openvino; torch-compile compiles the "
                             "checkpoint's network")
        return torch.compile(network, dynamic=False)
    if model_file is not None and not Path(model_file).is_file():
        from medunet.io.errors import InputError

        raise InputError(model_file, "exported model file not found")
    example = probe_inputs(network, patch_size, in_channels)[0]
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(network, model_file if model_file is not None else onnx_model(network, example))
    return OpenVINOEngine(network, model_file, precision="bf16" if bf16 else "f32", example=example)


# --------------------------------------------------------------------------------------------------
def calibration_windows(images: Sequence[torch.Tensor], window: Sequence[int], count: int = 64,
                        seed: int = 0) -> list[np.ndarray]:
    """``count`` windows ``(1, C, *window)`` float32 cut at random places from preprocessed images
    ``(C, *S)`` (in turn; images smaller than the window are zero-padded at the end)."""
    if not images:
        raise ValueError("int8 calibration needs at least one image")
    rng = np.random.default_rng(seed)
    windows = []
    for i in range(int(count)):
        x = images[i % len(images)]
        spatial = x.shape[1:]
        pad = [max(0, int(w) - int(s)) for w, s in zip(window, spatial)]
        if any(pad):
            x = torch.nn.functional.pad(x, [v for p in reversed(pad) for v in (0, p)])
        starts = [int(rng.integers(0, s - int(w) + 1)) for s, w in zip(x.shape[1:], window)]
        crop = x[(slice(None), *[slice(a, a + int(w)) for a, w in zip(starts, window)])]
        windows.append(np.ascontiguousarray(crop.unsqueeze(0).to(torch.float32).cpu().numpy()))
    return windows


def calibration_from_images(predictor, paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """:func:`calibration_windows` of image files, each read and preprocessed as ``predictor`` (a
    :class:`~medunet.inference.Predictor`) does, at a window size its network accepts near the patch."""
    from medunet.io import read_image

    images = []
    for path in paths:
        image = read_image(path)
        images.append(predictor.preprocess(predictor._to_channels_first(image), image.affine)[0])
    plan = predictor.plan
    window = probe_inputs(predictor.network, plan.patch_size, plan.in_channels)[0].shape[2:]
    return calibration_windows(images, window)


def quantize_openvino(model, windows: Sequence[np.ndarray]):
    """NNCF post-training int8 quantisation of an ``openvino.Model`` calibrated on ``windows``."""
    nncf = require("nncf")
    with warnings_quiet():
        return nncf.quantize(model, nncf.Dataset(list(windows)), subset_size=len(windows))


def export_model(network: torch.nn.Module, fmt: str, path: str | os.PathLike, patch_size: Sequence[int],
                 in_channels: int, tolerance: float = 1e-3,
                 calibration: Sequence[np.ndarray] | None = None) -> dict:
    """Write ``network`` as a TorchScript, ONNX or OpenVINO IR file and check it against eager.

    Args:
        network: the eager network (weights loaded; run on the CPU here).
        fmt: ``"torchscript"`` (``.pt``, traced), ``"onnx"`` (``.onnx``) or ``"openvino"`` (``.xml`` +
            ``.bin``, float32 weights).
        path: the output file (the suffix of ``fmt`` is added when missing).
        patch_size, in_channels: the check inputs' size (see :func:`probe_inputs`).
        tolerance: largest allowed max |exported − eager| over the check inputs' logits.
        calibration: ``"openvino"`` only: quantise to int8 with these windows ``(1, C, *S)``
            (:func:`calibration_windows`). The check then runs on the calibration windows and
            ``tolerance`` bounds the fraction of voxels whose argmax label changes (not the logits).

    Returns:
        ``{"format", "files", "max_abs_diff", "max_abs_logit", "shapes", "export_s"}``, and for int8
        ``"label_change"`` (fraction of calibration-window voxels whose argmax differs from eager).

    Raises:
        ValueError: the exported network's output differs from eager by more than ``tolerance`` (no
            file is left behind), or ``fmt`` is unknown.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {fmt!r}")
    path = Path(path)
    if path.suffix != FORMATS[fmt]:
        path = path.with_name(path.name + FORMATS[fmt])
    if calibration is not None and fmt != "openvino":
        raise ValueError(f"int8 quantisation is for the openvino format, not {fmt!r}")
    network = network.to("cpu").eval()
    probes = probe_inputs(network, patch_size, in_channels)
    if calibration is not None:  # check where it matters: real windows, not noise
        probes = [torch.from_numpy(w) for w in calibration[: min(len(calibration), 8)]]
    with torch.no_grad():
        eager = [network(x) for x in probes]
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}.export.", dir=path.parent))
    try:
        staged = work / path.name
        if fmt == "torchscript":
            with warnings_quiet(), torch.no_grad():
                traced = torch.jit.trace(network, probes[0], check_trace=False)
            torch.jit.save(traced, os.fspath(staged))
            engine: torch.nn.Module = _TorchScriptEngine(network, staged)
            files = [staged]
        elif fmt == "onnx":
            proto = onnx_model(network, probes[0])
            staged.write_bytes(proto.SerializeToString())
            engine = OnnxRuntimeEngine(network, staged)
            files = [staged]
        else:
            ov = require("openvino")
            model = openvino_model(network, probes[0])
            if calibration is not None:
                model = quantize_openvino(model, calibration)
            ov.save_model(model, os.fspath(staged), compress_to_fp16=False)
            engine = OpenVINOEngine(network, staged, precision="f32")
            files = [staged.with_suffix(".bin"), staged]
        seconds = time.perf_counter() - start
        with torch.no_grad():
            outputs = [engine(x) for x in probes]
        worst = max(float((o - e).abs().max()) for o, e in zip(outputs, eager))
        measure = worst
        extra = {}
        if calibration is not None:
            changed = sum(int((o.argmax(1) != e.argmax(1)).sum()) for o, e in zip(outputs, eager))
            extra["label_change"] = measure = changed / sum(e[:, 0].numel() for e in eager)
        if not measure <= tolerance:
            if calibration is not None:
                raise ValueError(f"{path}: int8 changes the label of {measure:.2%} of the calibration voxels "
                                 f"(tolerance {tolerance:g}); not written")
            raise ValueError(f"{path}: the exported {fmt} network differs from the eager one by {worst:.3g} "
                             f"(tolerance {tolerance:g}); not written")
        finals = []
        for f in files:  # the .bin before the .xml that needs it
            final = path.with_suffix(f.suffix)
            with atomic_path(final) as tmp:
                shutil.copyfile(f, tmp)
            finals.append(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"format": fmt, "files": [str(f) for f in finals], "max_abs_diff": worst,
            "max_abs_logit": max(float(e.abs().max()) for e in eager),
            "shapes": [tuple(x.shape) for x in probes], "export_s": seconds, **extra}
