"""Building the native kernels: the CPU's instruction-set class, compiler flags, the build cache and its lock.

One build directory per (sources, flags, torch version, Python ABI, ISA class):
    $KVLOOM_KERNEL_CACHE (default ~/.cache/kvloom/kernels) / <isa>-<hash>/
holding the torch extension `kvloom_kernels_<hash>`. Builds of one entry are serialised by an fcntl.flock on
<build dir>/kvloom.lock; the kernel drops that lock when its holder dies, so a build killed half-way never
blocks a later start (torch's own 'lock' file, which a killed build leaves behind, is removed while the flock
is held).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from functools import lru_cache

from kvloom.errors import KvloomError

log = logging.getLogger("kvloom.kernels")

SRC_DIR = os.path.dirname(os.path.abspath(__file__))
ISA_CLASSES = ("baseline", "avx2", "avx512", "avx512_vnni")   # ascending; KVLOOM_ISA also takes "native"
_REQUIRES = {
    "baseline": frozenset(),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
}
_REQUIRES["avx512"] = _REQUIRES["avx2"] | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
_REQUIRES["avx512_vnni"] = _REQUIRES["avx512"] | {"avx512_vnni"}
_ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
_ISA_FLAGS["avx512"] = _ISA_FLAGS["avx2"] + ["-mavx512f", "-mavx512cd", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
_ISA_FLAGS["avx512_vnni"] = _ISA_FLAGS["avx512"] + ["-mavx512vnni"]
# Noted in kernels_status(), not used to pick a class (-march=native turns them on where the CPU has them).
_NOTABLE = ("avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
# -fopenmp: at::parallel_for is inline OpenMP code; without it the kernels run on one thread.
_BASE_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
FIRST_BUILD_SECONDS = 90          # what the first-start log line announces (measured: 87 s on 2 Zen 4 cores)
DEFAULT_LOCK_TIMEOUT = 900.0      # seconds to wait for another process's build (KVLOOM_KERNEL_LOCK_TIMEOUT)
MARKER = "kvloom_build.json"      # written into the build directory once a build has loaded


class KernelBuildError(KvloomError, RuntimeError):
    """The native kernels were asked for but cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class CpuInfo:
    isa: str                  # the highest class of ISA_CLASSES this CPU runs
    features: tuple           # the notable extra features it has (_NOTABLE)
    fingerprint: str          # the whole flag list and model name: what -march=native compiles for


def detect_isa(flags) -> str:
    """The highest class in ISA_CLASSES whose required /proc/cpuinfo flags are all in `flags`."""
    flags = set(flags)
    best = "baseline"
    for isa in ISA_CLASSES:
        if _REQUIRES[isa] <= flags:
            best = isa
    return best


def parse_cpuinfo(text: str) -> CpuInfo:
    flags: list[str] = []
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = value.split()
        elif key == "model name" and not model:
            model = value.strip()
    fp = hashlib.sha256((model + "\n" + " ".join(sorted(flags))).encode()).hexdigest()[:16]
    return CpuInfo(detect_isa(flags), tuple(f for f in _NOTABLE if f in flags), fp)


@lru_cache(maxsize=4)
def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuInfo("baseline", (), "unknown")


def requested_isa() -> str:
    return (os.environ.get("KVLOOM_ISA") or "native").strip().lower()


def resolve_isa(request: str, cpu: CpuInfo) -> tuple[str, list[str]]:
    """(class, ISA compiler flags) for a KVLOOM_ISA value on this CPU; a class above the CPU's is an error."""
    if request == "native":
        return cpu.isa, ["-march=native"]
    if request not in ISA_CLASSES:
        raise KernelBuildError(f"KVLOOM_ISA={request!r} is not one of native, {', '.join(reversed(ISA_CLASSES))}")
    if ISA_CLASSES.index(request) > ISA_CLASSES.index(cpu.isa):
        raise KernelBuildError(f"KVLOOM_ISA={request} asks for more than this CPU runs: its class is {cpu.isa} "
                               f"(needs {', '.join(sorted(_REQUIRES[request] - _REQUIRES[cpu.isa]))}); "
                               f"use KVLOOM_ISA={cpu.isa} or native")
    return request, list(_ISA_FLAGS[request])


def cache_root() -> str:
    return os.environ.get("KVLOOM_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvloom",
                                                                  "kernels")


def source_files(src_dir: str = SRC_DIR) -> tuple[list[str], list[str]]:
    """(the .cpp files compiled, the headers they include), sorted: every *.cpp of the folder is compiled."""
    return sorted(glob.glob(os.path.join(src_dir, "*.cpp"))), sorted(glob.glob(os.path.join(src_dir, "*.h")))


@dataclass(frozen=True)
class Plan:
    """What one build compiles, with which flags, into which directory."""

    request: str              # the KVLOOM_ISA value
    isa: str                  # the class compiled for
    cpu: CpuInfo
    sources: tuple
    cflags: tuple
    ldflags: tuple
    key: str                  # hash of sources, headers, flags, torch version, Python ABI and ISA
    build_dir: str

    @property
    def name(self) -> str:
        return f"kvloom_kernels_{self.key}"

    @property
    def library(self) -> str:
        return os.path.join(self.build_dir, self.name + (sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"))

    @property
    def built(self) -> bool:
        return os.path.exists(os.path.join(self.build_dir, MARKER))


def make_plan(request: str | None = None, src_dir: str = SRC_DIR, root: str | None = None) -> Plan:
    import torch

    request = request or requested_isa()
    cpu = cpu_info()
    isa, isa_flags = resolve_isa(request, cpu)
    cpp, headers = source_files(src_dir)
    if not cpp:
        raise KernelBuildError(f"no kernel sources (*.cpp) in {src_dir}: the package is installed incompletely")
    cflags = _BASE_CFLAGS + isa_flags
    h = hashlib.sha256()
    # The sources' directory counts too: the build rules name the sources by path, so two checkouts sharing
    # one build directory would rebuild it each time the other loaded it.
    for part in (torch.__version__, sysconfig.get_config_var("SOABI") or sys.version, isa, " ".join(cflags),
                 " ".join(_LDFLAGS), cpu.fingerprint if request == "native" else "", os.path.realpath(src_dir)):
        h.update(part.encode() + b"\0")
    for path in cpp + headers:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    key = h.hexdigest()[:16]
    return Plan(request, isa, cpu, tuple(cpp), tuple(cflags), tuple(_LDFLAGS), key,
                os.path.join(root or cache_root(), f"{isa}-{key}"))


def _lock_timeout() -> float:
    try:
        return float(os.environ.get("KVLOOM_KERNEL_LOCK_TIMEOUT") or DEFAULT_LOCK_TIMEOUT)
    except ValueError:
        raise KernelBuildError("KVLOOM_KERNEL_LOCK_TIMEOUT must be a number of seconds") from None


@contextlib.contextmanager
def build_lock(build_dir: str, timeout: float | None = None):
    """Hold the flock of build_dir/kvloom.lock; if another live process holds it, say so and wait, at most
    `timeout` seconds. The lock file records the holder's pid."""
    timeout = _lock_timeout() if timeout is None else timeout
    path = os.path.join(build_dir, "kvloom.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            log.warning("waiting for another process compiling the kernels (pid %s) in %s, at most %.0f s",
                        holder, build_dir, timeout)
            start = time.monotonic()
            deadline, next_note = start + timeout, start + 60
            while True:
                time.sleep(0.2)
                if time.monotonic() > next_note:
                    log.info("still waiting for pid %s compiling the kernels (%.0f s)", holder, next_note - start)
                    next_note += 60
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e2:
                    if e2.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() > deadline:
                    raise KernelBuildError(
                        f"waited {timeout:.0f} s for process {holder} compiling the native kernels in {build_dir}; "
                        f"if it is stuck, end it, or start without kernels (--no-native-kernels or "
                        f"KVLOOM_NO_KERNELS=1); KVLOOM_KERNEL_LOCK_TIMEOUT sets the wait") from None
            log.info("the other process finished; loading the kernels it built")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # drops the flock


def _ensure_ninja() -> None:
    if shutil.which("ninja"):
        return
    try:
        import ninja   # the pip package: its binary may sit outside PATH (python run by its full path)
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def load(plan: Plan):
    """Build (if needed) and import the plan's extension; KernelBuildError with the compiler's message on failure."""
    from torch.utils.cpp_extension import load as torch_load

    os.makedirs(plan.build_dir, exist_ok=True)
    with build_lock(plan.build_dir):
        stale = os.path.join(plan.build_dir, "lock")
        if os.path.exists(stale):   # torch's FileBaton of a build that was killed: it would wait on it forever
            log.warning("removing stale torch lock file %s left by a killed build", stale)
            os.remove(stale)
        first = not plan.built
        if first:
            log.info("compiling native kernels for %s (first start on this machine, ~%d s) into %s",
                     plan.isa, FIRST_BUILD_SECONDS, plan.build_dir)
        else:
            log.info("loading native kernels for %s from %s", plan.isa, plan.build_dir)
        _ensure_ninja()
        if not os.path.exists(plan.library):
            # torch remembers in-process that it ran this build and would skip a retry after a failure.
            from torch.utils import cpp_extension
            getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", {}).pop(plan.name, None)
        t0 = time.monotonic()
        try:
            module = torch_load(plan.name, list(plan.sources), extra_cflags=list(plan.cflags),
                                extra_ldflags=list(plan.ldflags), build_directory=plan.build_dir, verbose=False)
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear error
            raise KernelBuildError(
                f"building the native kernels for {plan.isa} in {plan.build_dir} failed: {e}\n"
                f"Fix the build, or run without native kernels: --no-native-kernels or KVLOOM_NO_KERNELS=1") from e
        seconds = time.monotonic() - t0
        if first:
            import torch
            with open(os.path.join(plan.build_dir, MARKER + ".tmp"), "w") as f:
                json.dump({"isa": plan.isa, "request": plan.request, "cflags": list(plan.cflags),
                           "torch": torch.__version__, "sources": [os.path.basename(s) for s in plan.sources],
                           "seconds": round(seconds, 1), "pid": os.getpid(), "time": time.time()}, f)
            os.replace(os.path.join(plan.build_dir, MARKER + ".tmp"), os.path.join(plan.build_dir, MARKER))
            log.info("compiled native kernels for %s in %.1f s", plan.isa, seconds)
        return module
