"""The native-kernel build: ISA classes and flags, the cache key, loud failures, and locks that never hang.

The builds here compile small stand-in sources (a plain CPython module that reports which ISA macros it was
compiled with, plus a generated file that takes a few seconds to compile) through the same code path as the
real kernels, so the kill-during-compile case runs in well under a minute.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import kvloom.kernels as K
from kvloom.kernels import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""\
    #include <Python.h>
    #define KV_CAT2(a, b) a##b
    #define KV_CAT(a, b) KV_CAT2(a, b)
    #define KV_STR2(a) #a
    #define KV_STR(a) KV_STR2(a)
    static PyObject* isa(PyObject*, PyObject*) {
    #if defined(__AVX512F__) && defined(__AVX512VNNI__)
      return PyUnicode_FromString("avx512_vnni");
    #elif defined(__AVX512F__)
      return PyUnicode_FromString("avx512");
    #elif defined(__AVX2__) && defined(__FMA__)
      return PyUnicode_FromString("avx2");
    #else
      return PyUnicode_FromString("baseline");
    #endif
    }
    static PyMethodDef methods[] = {{"isa", isa, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, KV_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
    PyMODINIT_FUNC KV_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
    """)


def _sources(path, slow_functions=0, broken=False):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "probe.cpp"), "w") as f:
        f.write(PROBE)
    with open(os.path.join(path, "probe.h"), "w") as f:
        f.write("// shipped header: part of the cache key\n")
    if slow_functions:
        with open(os.path.join(path, "slow.cpp"), "w") as f:
            for i in range(slow_functions):
                f.write(f"double f{i}(const double* a, int n) {{ double s = 0; for (int j = 0; j < n; j++) "
                        f"s += a[j] * {i}.5 / (a[j] + {i}); return s; }}\n")
    if broken:
        with open(os.path.join(path, "broken.cpp"), "w") as f:
            f.write("int kvloom_broken = undeclared_identifier_xyz;\n")
    return str(path)


_BUILD = ("import logging, sys\n"
          "logging.basicConfig(level=logging.INFO)\n"
          "from kvloom.kernels import build\n"
          "m = build.load(build.make_plan(request=sys.argv[2], src_dir=sys.argv[1]))\n"
          "print('BUILT', m.isa())\n")


def _env(cache, **extra):
    env = dict(os.environ, KVLOOM_KERNEL_CACHE=str(cache), PYTHONPATH=ROOT, **extra)
    env.pop("KVLOOM_NO_KERNELS", None)
    return env


def _cpu_class():
    return build.cpu_info().isa


# -- ISA classes and flags ---------------------------------------------------------------------------------

def test_isa_class_from_cpuinfo_flags():
    spr = "flags : fpu sse2 avx f16c fma avx2 avx512f avx512cd avx512bw avx512dq avx512vl avx512_vnni amx_int8\n"
    info = build.parse_cpuinfo("model name : X\n" + spr)
    assert info.isa == "avx512_vnni" and "amx_int8" in info.features
    assert build.detect_isa("avx f16c fma avx2 avx_vnni".split()) == "avx2"
    assert build.detect_isa("avx f16c avx2".split()) == "baseline"          # no fma: not the avx2 class
    assert build.detect_isa("f16c fma avx2 avx512f avx512cd avx512bw avx512dq avx512vl".split()) == "avx512"
    assert build.parse_cpuinfo("processor : 0\nFeatures : fp asimd\n").isa == "baseline"   # arm


def test_each_class_gets_its_flags_and_its_own_cache_entry(tmp_path):
    machine = _cpu_class()
    plans = {}
    for req in ("native",) + build.ISA_CLASSES[:build.ISA_CLASSES.index(machine) + 1]:
        plans[req] = build.make_plan(request=req, root=str(tmp_path))
    assert "-march=native" in plans["native"].cflags and plans["native"].isa == machine
    if "avx2" in plans:
        fl = plans["avx2"].cflags
        assert {"-mavx2", "-mfma", "-mf16c"} <= set(fl)
        assert not any(f.startswith("-march") or f.startswith("-mavx512") for f in fl)
    for req, p in plans.items():
        assert p.build_dir.startswith(str(tmp_path)) and p.key in p.name
    assert len({p.build_dir for p in plans.values()}) == len(plans)
    assert build.make_plan(request="native", root=str(tmp_path)) == plans["native"]      # stable key


def test_every_cpp_and_header_is_in_the_key(tmp_path):
    src = _sources(tmp_path / "src")
    a = build.make_plan(request="baseline", src_dir=src, root=str(tmp_path))
    with open(os.path.join(src, "probe.h"), "a") as f:
        f.write("// edited\n")
    b = build.make_plan(request="baseline", src_dir=src, root=str(tmp_path))
    with open(os.path.join(src, "extra.cpp"), "w") as f:
        f.write("int kvloom_extra = 1;\n")
    c = build.make_plan(request="baseline", src_dir=src, root=str(tmp_path))
    assert len({a.key, b.key, c.key}) == 3 and os.path.join(src, "extra.cpp") in c.sources


def test_asking_for_more_than_the_cpu_has_is_a_clear_error(monkeypatch):
    avx2_cpu = build.CpuInfo("avx2", ("avx_vnni",), "x")
    monkeypatch.setattr(build, "cpu_info", lambda: avx2_cpu)
    with pytest.raises(K.KernelBuildError, match="KVLOOM_ISA=avx512 asks for more than this CPU runs.*avx2"):
        build.make_plan(request="avx512")
    with pytest.raises(K.KernelBuildError, match="not one of"):
        build.make_plan(request="sse9")
    assert build.make_plan(request="avx2").isa == "avx2"


def test_the_requested_class_selects_the_code_path(tmp_path):
    src = _sources(tmp_path / "src")
    machine = _cpu_class()
    for req in build.ISA_CLASSES[:build.ISA_CLASSES.index(machine) + 1]:
        mod = build.load(build.make_plan(request=req, src_dir=src, root=str(tmp_path / "cache")))
        assert mod.isa() == req
    mod = build.load(build.make_plan(request="native", src_dir=src, root=str(tmp_path / "cache")))
    assert mod.isa() == machine


# -- failures are loud; off is explicit ----------------------------------------------------------------------

def test_a_compile_error_raises_with_the_compilers_message(tmp_path, monkeypatch):
    src = _sources(tmp_path / "src", broken=True)
    plan = build.make_plan(request="baseline", src_dir=src, root=str(tmp_path / "cache"))
    with pytest.raises(K.KernelBuildError, match="undeclared_identifier_xyz"):
        build.load(plan)
    # kernels() raises it too (every call), and kernels_status() says why they are off.
    monkeypatch.setattr(K, "_module", None)
    monkeypatch.setattr(K, "_error", None)
    monkeypatch.setattr(K, "_plan", None)
    monkeypatch.setattr(K, "make_plan", lambda: plan)
    monkeypatch.delenv("KVLOOM_NO_KERNELS", raising=False)
    for _ in range(2):
        with pytest.raises(K.KernelBuildError, match="undeclared_identifier_xyz"):
            K.kernels()
    st = K.kernels_status()
    assert st["native_kernels"] is False and "undeclared_identifier_xyz" in st["reason"]
    assert st["build_dir"] == plan.build_dir and st["built"] is False


def test_off_only_when_asked(monkeypatch):
    monkeypatch.setattr(K, "_module", None)
    monkeypatch.setattr(K, "_error", None)
    monkeypatch.setenv("KVLOOM_NO_KERNELS", "1")
    assert K.kernels() is None
    st = K.kernels_status()
    assert st["native_kernels"] is False and "KVLOOM_NO_KERNELS" in st["reason"] and st["isa"] == _cpu_class()
    monkeypatch.delenv("KVLOOM_NO_KERNELS")
    assert "--no-native-kernels" in K.kernels_status(native_kernels=False)["reason"]
    assert set(K.kernels_status()) >= {"native_kernels", "isa", "cpu_isa", "build_dir", "reason"}


# -- locks -----------------------------------------------------------------------------------------------------

def test_a_live_builder_is_waited_for_with_a_message_and_a_timeout(tmp_path, caplog):
    d = str(tmp_path)
    with build.build_lock(d, timeout=1):
        with caplog.at_level("WARNING", logger="kvloom.kernels"):
            t0 = time.monotonic()
            with pytest.raises(K.KernelBuildError, match=f"waited 1 s for process {os.getpid()}"):
                with build.build_lock(d, timeout=1):
                    pass
            assert time.monotonic() - t0 < 10
        assert f"waiting for another process compiling the kernels (pid {os.getpid()})" in caplog.text

    holder = threading.Event()

    def hold():
        with build.build_lock(d, timeout=1):
            holder.set()
            time.sleep(1.0)

    t = threading.Thread(target=hold)
    t.start()
    holder.wait(10)
    with build.build_lock(d, timeout=30):   # got it once the holder let go
        pass
    t.join()


def test_a_build_killed_mid_compile_does_not_block_the_next_start(tmp_path):
    src = _sources(tmp_path / "src", slow_functions=600)
    cache = tmp_path / "cache"
    plan = build.make_plan(request="baseline", src_dir=src, root=str(cache))
    first = subprocess.Popen([sys.executable, "-c", _BUILD, src, "baseline"], env=_env(cache),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        torch_lock = os.path.join(plan.build_dir, "lock")
        while not (os.path.exists(torch_lock) and os.path.exists(os.path.join(plan.build_dir, "build.ninja"))):
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "the build never started compiling"
            time.sleep(0.05)
        time.sleep(0.5)                       # ninja and the compiler are running
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the process and its compilers, as a killed container would
        first.wait(30)
    assert os.path.exists(torch_lock) and not os.path.exists(plan.library), "the kill came after the compile"

    second = subprocess.run([sys.executable, "-c", _BUILD, src, "baseline"], env=_env(cache),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "BUILT baseline" in second.stdout
    assert "stale torch lock file" in second.stderr and "compiling native kernels for baseline" in second.stderr


def test_a_stale_torch_lock_in_a_built_cache_does_not_block(tmp_path):
    src = _sources(tmp_path / "src")
    cache = tmp_path / "cache"
    plan = build.make_plan(request="baseline", src_dir=src, root=str(cache))
    build.load(plan)
    assert plan.built
    open(os.path.join(plan.build_dir, "lock"), "w").close()   # what a build killed by an older kvloom leaves
    out = subprocess.run([sys.executable, "-c", _BUILD, src, "baseline"], env=_env(cache),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BUILT baseline" in out.stdout and "loading native kernels for baseline" in out.stderr
    assert not os.path.exists(os.path.join(plan.build_dir, "lock"))
