"""The runtimes that run an exported graph: onnxruntime and OpenVINO, behind one small session interface.

No torch here (the ONNX predictor imports this). Each session is opened on one `.onnx` file and runs it on
named numpy inputs, returning its outputs in order, as numpy arrays the caller owns.

OpenVINO's CPU plugin picks bf16 by itself on CPUs that have it (AMX, AVX-512 BF16); here the precision is
always set explicitly: `f32` unless `bf16` is asked for, and `bf16` is refused with a clear message on a CPU
whose plugin does not list it (no silent fallback, no silent emulation).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
RUNTIMES = (ONNXRUNTIME, OPENVINO)
F32, BF16 = "f32", "bf16"
PRECISIONS = (F32, BF16)
OPENVINO_DEVICE = "CPU"


class Session(Protocol):
    """One graph, ready to run."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs, in `output_names` order, for `feeds` (by input name; extra names are ignored)."""
        ...


class OnnxruntimeSession:
    def __init__(self, path: Path, threads: int | None, providers: Sequence[str], memory_arena: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.enable_cpu_mem_arena = memory_arena
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        used = {name: feeds[name] for name in self.input_names}
        return [np.asarray(output) for output in self.session.run(self.output_names, used)]


def openvino_capabilities() -> tuple[str, ...]:
    """The optimisation capabilities of OpenVINO's CPU plugin on this machine (FP32, BF16, INT8, ...)."""
    import openvino as ov

    return tuple(ov.Core().get_property(OPENVINO_DEVICE, "OPTIMIZATION_CAPABILITIES"))


def openvino_has_bf16() -> bool:
    """OpenVINO's CPU plugin lists bf16 among its capabilities here (AMX, AVX-512 BF16)."""
    return BF16.upper() in openvino_capabilities()


def openvino_cpu_name() -> str:
    import openvino as ov

    return str(ov.Core().get_property(OPENVINO_DEVICE, "FULL_DEVICE_NAME"))


def check_precision(runtime: str, precision: str) -> None:
    """Raises a `ValueError` unless `runtime` can run at `precision` on this machine."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == BF16 and runtime == ONNXRUNTIME:
        raise ValueError("onnxruntime runs the export in f32 only: use runtime='openvino' for bf16")
    if precision == BF16 and not openvino_has_bf16():
        raise ValueError(
            f"OpenVINO's CPU plugin has no bf16 on this CPU ({openvino_cpu_name()}; capabilities: "
            f"{', '.join(openvino_capabilities())}): use precision='f32'"
        )


class OpenvinoSession:
    """A graph compiled by OpenVINO's CPU plugin at an explicit precision, for latency (one request at a time).
    With `cache_dir`, the compiled model is written there and a later session of the same file, options and
    OpenVINO version loads it instead of compiling again."""

    def __init__(
        self, path: Path, threads: int | None, precision: str, cache_dir: Path | None, names: Sequence[str]
    ) -> None:
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        core = ov.Core()
        self.compiled = core.compile_model(str(path), OPENVINO_DEVICE, config)
        self.request = self.compiled.create_infer_request()
        known = set(names)

        # OpenVINO keeps every name a tensor had; the ONNX input or output name is among them
        def name(port: Any) -> str:
            return next((n for n in sorted(port.names) if n in known), port.get_any_name())

        self._inputs = {name(port): port for port in self.compiled.inputs}
        self._outputs = [(name(port), port) for port in self.compiled.outputs]
        self.input_names = list(self._inputs)
        self.output_names = [n for n, _ in self._outputs]

    @property
    def loaded_from_cache(self) -> bool:
        return bool(self.compiled.get_property("LOADED_FROM_CACHE"))

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer({port: feeds[name] for name, port in self._inputs.items()})
        # copies: the request's buffers are reused by its next run
        return [np.array(results[port], copy=True) for _, port in self._outputs]


def open_session(
    path: Path,
    runtime: str,
    names: Sequence[str],
    *,
    threads: int | None = None,
    precision: str = F32,
    cache_dir: Path | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    memory_arena: bool = True,
) -> Session:
    """`path` opened in `runtime` (checked with `check_precision` first). `names`: the graph's input and output
    names as model.json lists them; `providers` and `memory_arena` are onnxruntime's, `precision` and
    `cache_dir` OpenVINO's."""
    check_precision(runtime, precision)
    if runtime == ONNXRUNTIME:
        if cache_dir is not None:
            raise ValueError("cache_dir is OpenVINO's (onnxruntime compiles nothing to cache)")
        return OnnxruntimeSession(path, threads, providers, memory_arena)
    return OpenvinoSession(path, threads, precision, cache_dir, names)
