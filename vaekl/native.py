"""A one-pass CPU kernel for the per-sample KL to the standard normal (XLA FFI).

XLA:CPU splits `sum(mean^2 + expm1mx(log_var), -1)` into an elementwise pass
that writes a full-size temporary and a reduction (see BENCHMARKS.md), so on a
[10^6, 64] batch it runs at a tenth of the memory bandwidth. `_native/kl_diag.cc`
does the same arithmetic (the series near 0, to 2e-7 relative in float32) in one
vectorised pass over XLA's intra-op threads.

The kernel is compiled with the system C++ compiler (`$CXX`, else g++ or c++)
on first use and cached in `$VAEKL_CACHE` (default ~/.cache/vaekl), keyed by
its source, build flags, jaxlib and the CPU's instruction set. If no compiler is found or
the build fails, or `VAEKL_NATIVE=0`, `available()` is False and vaekl uses
the XLA formulation: results agree to float32 rounding.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
from absl import logging

SOURCE = Path(__file__).parent / "_native" / "kl_diag.cc"
TARGET = "vaekl_kl_diag"
# Below this many elements XLA's fused version is as fast and keeps fusing with
# its neighbours (a training step's [128, 20] KL stays XLA's).
MIN_ELEMENTS = 1 << 16


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


# -fno-trapping-math lets the compiler vectorise the portable form's selects (GCC 12
# left it scalar for AVX2 without it); vaekl does not rely on floating-point traps.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
         "-std=c++17", "-shared", "-fPIC", "-w")


def _compile(cxx: str, out: Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Builds the kernel for this CPU (AVX-512 where it has it; `extra_flags` can say no)."""
    cmd = [cxx, *FLAGS, *extra_flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: `$CXX`, else g++ or c++ (None if none)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path() -> Path:
    """The compiled kernel, building it into the cache first if needed."""
    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    import jaxlib

    key = hashlib.sha256("\n".join([SOURCE.read_text(), jaxlib.__version__, cxx, *FLAGS,
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VAEKL_CACHE", Path.home() / ".cache" / "vaekl"))
    path = cache / f"kl_diag-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            _compile(cxx, Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (tried once per process)."""
    if os.environ.get("VAEKL_NATIVE", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(library_path()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.VaeklKlDiag), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use XLA's formulation.
        logging.warning("vaekl: the native KL kernel is unavailable (%s); using XLA's.", e)
        return False
    return True


def kl_standard_normal(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """KL(N(mean, diag e^log_var) || N(0, I)) per row: float32 [..., dim] -> [...], CPU only.

    Call only where `available()`; `vaekl.kl.analytic` chooses it for large
    float32 inputs against the standard normal and differentiates it itself.
    """
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(mean.shape[:-1], mean.dtype),
                            vmap_method="broadcast_all")(mean, log_var)
