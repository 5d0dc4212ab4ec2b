"""The CPU guard (aios.llm.cpu) and the build it protects (aios.llm.build).

The guard decides, before the first decode, whether a llama.cpp library would crash on this CPU
(AMX advertised where its first instruction faults; a build for instructions the CPU lacks).
Machines without AMX cannot show the crash, so its decisions are tested on fabricated CPU flags
and library facts, and the default build is checked to hold no AMX code at all. The tests
marked ``model`` load the installed library for real.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aios.config import CoreConfig
from aios.errors import IncompatibleBuild, ModelLoadError
from aios.llm import build, cpu
from aios.llm.cpu import CpuFacts, LibraryFacts, LoadPlan, decide


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# A Sapphire Rapids VM as seen in issue 13 (abridged), and a Skylake-AVX512 without AMX.
SPR = words(
    "fpu sse sse2 pni ssse3 fma f16c avx avx2 bmi2 avx512f avx512_vnni avx512_bf16 "
    "avx512vbmi avx_vnni amx_bf16 amx_tile amx_int8"
)
SKYLAKE = words("fpu sse sse2 pni ssse3 fma f16c avx avx2 bmi2 avx512f")
NATIVE_SPR = words(
    "SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 "
    "AMX_INT8 OPENMP REPACK"
)
NATIVE_SPR_NO_AMX = NATIVE_SPR - {"AMX_INT8"}


def lib(features: frozenset[str], *, switch: bool = True) -> LibraryFacts:
    return LibraryFacts("0.3.36", features, switch)


def test_amx_library_on_amx_cpu_loads_without_extra_buffers() -> None:
    plan = decide(CpuFacts("x86_64", SPR), lib(NATIVE_SPR))
    assert plan.extra_bufts is False
    assert plan.warning is not None and "AMX" in plan.warning and "20824" in plan.warning


def test_amx_can_be_trusted_on_purpose() -> None:
    assert decide(CpuFacts("x86_64", SPR), lib(NATIVE_SPR), allow_amx=True) == LoadPlan()


def test_amx_library_without_the_switch_is_refused_with_the_fix() -> None:
    with pytest.raises(IncompatibleBuild) as e:
        decide(CpuFacts("x86_64", SPR), lib(NATIVE_SPR, switch=False))
    message = str(e.value)
    assert "AMX" in message
    assert cpu.rebuild_command("0.3.36") in message
    assert isinstance(e.value, ModelLoadError)  # the edges treat it as a failed model load


@pytest.mark.parametrize(
    ("flags", "features"),
    [
        (SPR, NATIVE_SPR_NO_AMX),  # the default build on an AMX machine
        (SKYLAKE, frozenset({"SSE3", "AVX", "AVX2", "FMA", "F16C", "AVX512", "AMX_INT8"})),
        (SKYLAKE, frozenset({"SSE3", "AVX", "AVX2"})),
    ],
)
def test_nothing_changes_where_nothing_can_fault(
    flags: frozenset[str], features: frozenset[str]
) -> None:
    # No AMX in the library, or no AMX on the CPU (the AMX buffer type then refuses to start).
    assert decide(CpuFacts("x86_64", flags), lib(features)) == LoadPlan()


def test_a_build_for_another_cpu_is_refused_before_it_dies_of_sigill() -> None:
    old = words("fpu sse sse2 pni ssse3 avx")  # no AVX2, FMA, AVX-512
    with pytest.raises(IncompatibleBuild) as e:
        decide(CpuFacts("x86_64", old), lib(NATIVE_SPR_NO_AMX))
    message = str(e.value)
    assert "AVX2" in message and "AVX512" in message and "FMA" in message
    assert "SSE3" not in message.split("(")[2]  # only what is missing is named
    assert "pip install --force-reinstall" in message


@pytest.mark.parametrize(
    "cpu_facts", [CpuFacts("aarch64", frozenset({"fp", "asimd"})), CpuFacts("x86_64", frozenset())]
)
def test_unknown_or_other_architectures_are_left_alone(cpu_facts: CpuFacts) -> None:
    assert decide(cpu_facts, lib(frozenset({"NEON", "AVX2", "AMX_INT8"}))) == LoadPlan()


def test_parsers_read_the_real_formats(tmp_path: Path) -> None:
    info = cpu.parse_system_info(
        "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | AMX_INT8 = 1 | OPENMP = 1 | "
        "REPACK = 1 | LLAMAFILE = 0 | "
    )
    assert info == {"SSE3", "SSSE3", "AVX", "AVX2", "AMX_INT8", "OPENMP", "REPACK"}
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 amx_tile\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 amx_tile\n"
    )
    host = CpuFacts.of_host(cpuinfo)
    assert host.flags == {"fpu", "avx2", "amx_tile"}
    assert host.model == "Intel(R) Xeon(R)"
    assert CpuFacts.of_host(tmp_path / "missing").flags == frozenset()


# -- the default build ---------------------------------------------------------------------


def test_the_default_build_switches_amx_off_on_x86_only() -> None:
    x86 = shlex.split(build.cmake_args("x86_64"))
    assert "-DLLAVA_BUILD=OFF" in x86
    for var in ("CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"):
        assert f"-D{var}=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in x86
    arm = shlex.split(build.cmake_args("aarch64"))
    assert arm == ["-DLLAVA_BUILD=OFF"]  # gcc on aarch64 rejects -mno-amx-*
    assert shlex.split(build.cmake_args("x86_64", " -DGGML_BLAS=ON "))[-1] == "-DGGML_BLAS=ON"


def spec(**changes: Any) -> build.BuildSpec:
    base = build.BuildSpec(
        version="0.3.36",
        cmake_args=build.cmake_args("x86_64"),
        compiler="cc (Debian 12.2.0-14+deb12u1) 12.2.0",
        target=("-march=sapphirerapids", "-mamx-tile", "-mtune=sapphirerapids"),
        python="cpython-311",
        platform="linux-x86_64",
    )
    return dataclasses.replace(base, **changes)


def test_a_wheel_built_another_way_is_never_the_cached_one() -> None:
    """pip keys its wheel cache by the sdist alone; ours keys by everything the build used."""
    key = spec().key()
    assert spec().key() == key  # stable
    assert key.startswith("0.3.36-")
    others = [
        spec(cmake_args="-DLLAVA_BUILD=OFF"),  # the old recipe, with AMX
        spec(target=("-march=skylake-avx512", "-mtune=skylake-avx512")),  # another CPU
        spec(compiler="clang version 16.0.6"),
        spec(version="0.3.37"),
        spec(python="cpython-312"),
    ]
    assert len({key, *(s.key() for s in others)}) == 1 + len(others)


def test_native_target_keeps_flags_and_drops_paths() -> None:
    gcc = (
        "Using built-in specs.\n"
        ' /usr/lib/gcc/x86_64-linux-gnu/12/cc1 -quiet /dev/null "-march=sapphirerapids" -mmmx '
        "-mamx-tile -mno-sse4a --param l1-cache-size=48 -mtune=sapphirerapids -o /tmp/ccA1b2.s\n"
        " as --64 -o /dev/null /tmp/ccA1b2.s\n"
    )
    assert build.native_target(gcc) == (
        "-march=sapphirerapids",
        "-mmmx",
        "-mamx-tile",
        "-mno-sse4a",
        "-mtune=sapphirerapids",
    )
    clang = ' "/usr/lib/llvm-16/bin/clang" "-cc1" "-triple" "x86_64-pc-linux-gnu" "-target-cpu" '
    clang += '"skylake-avx512" "-target-feature" "+avx2" "-o" "/tmp/x-123.o" "-x" "c" "/dev/null"'
    assert build.native_target(clang) == ("-target-cpu skylake-avx512", "-target-feature +avx2")


def test_a_stale_stamp_means_install_and_a_matching_one_means_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ensure`` installs unless the environment's stamp names this build's key, and takes the
    wheel of that key from the cache without compiling: an environment stamped by the old
    recipe (or none, as before this guard existed) gets the new build."""
    root, prefix = tmp_path / "wheels", tmp_path / "venv"
    wheel = root / spec().key() / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    prefix.mkdir()
    installed: list[Path] = []

    def no_build(*a: object) -> Path:
        raise AssertionError("compiled although a wheel of this key is cached")

    monkeypatch.setattr(build, "build_wheel", no_build)
    monkeypatch.setattr(build, "install_wheel", installed.append)
    monkeypatch.setattr(build, "inspect_installed", lambda python: lib(NATIVE_SPR_NO_AMX))
    monkeypatch.setattr(build, "_stamp_text", lambda key: f"{key} 0.3.36 1")
    monkeypatch.setattr(CpuFacts, "of_host", classmethod(lambda cls, *a: CpuFacts("x86_64", SPR)))

    old = spec(cmake_args="-DLLAVA_BUILD=OFF")
    (prefix / build.STAMP).write_text(f"{old.key()} 0.3.36 1\n")
    assert build.ensure(spec(), prefix=prefix, root=root) == "installed the cached wheel"
    assert installed == [wheel]
    assert (prefix / build.STAMP).read_text().split()[0] == spec().key()
    assert build.ensure(spec(), prefix=prefix, root=root) == "up to date"
    assert installed == [wheel]
    (prefix / build.STAMP).unlink()
    assert build.ensure(spec(), prefix=prefix, root=root) == "installed the cached wheel"


def test_a_library_that_cannot_run_here_fails_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "build_wheel", lambda *a: tmp_path / "x.whl")
    monkeypatch.setattr(build, "install_wheel", lambda wheel: None)
    monkeypatch.setattr(build, "inspect_installed", lambda python: lib(NATIVE_SPR_NO_AMX))
    monkeypatch.setattr(
        CpuFacts, "of_host", classmethod(lambda cls, *a: CpuFacts("x86_64", SKYLAKE - {"avx2"}))
    )
    with pytest.raises(build.BuildError, match="does not fit this CPU"):
        build.ensure(spec(), prefix=tmp_path, root=tmp_path / "wheels")
    assert not (tmp_path / build.STAMP).exists()


def test_the_pin_is_read_from_pyproject() -> None:
    import tomllib

    pyproject = Path(build.__file__).resolve().parents[2] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    embedded = project["optional-dependencies"]["embedded"]
    assert f"llama-cpp-python=={build.pinned_version()}" in embedded
    # A client (`pip install aios`: the SDK over HTTP) compiles nothing.
    assert not any(d.startswith("llama-cpp-python") for d in project["dependencies"])


# -- the installed library, for real -------------------------------------------------------


@pytest.mark.model
def test_the_installed_library_has_no_amx_code() -> None:
    import llama_cpp

    facts = LibraryFacts.of_module(llama_cpp)
    assert facts.has_extra_bufts_switch
    assert "AMX_INT8" not in facts.features, facts.features
    if not CpuFacts.of_host().is_x86:
        return
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the library"
    libs = list((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so*"))
    assert libs, "libggml-cpu.so not found next to llama_cpp"
    for so in libs:
        asm = subprocess.run([objdump, "-d", str(so)], capture_output=True, text=True, check=True)
        assert "ldtilecfg" not in asm.stdout, f"{so} holds AMX tile instructions"
        assert "vfmadd" in asm.stdout  # the disassembly is real: native FMA code is there


@pytest.mark.model
def test_the_default_install_decodes_in_a_child_process() -> None:
    """What a user on a new machine runs first: one real decode, in a process of its own so
    that a crash (the AMX segfault was exit 139) fails this test instead of the suite."""
    question = "What is the capital of France?"
    done = subprocess.run(
        [sys.executable, "-m", "aios.cli", "chat", question, "--max-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "Paris" in done.stdout, done.stdout


async def _ask_paris() -> str:
    from aios.config import KernelConfig
    from aios.kernel import Kernel
    from aios.syscall import LLMCall, Message, SamplingParams

    call = LLMCall(
        messages=(Message("user", "What is the capital of France?"),),
        params=SamplingParams(max_tokens=16),
    )
    # In process: the guard's fabricated facts (monkeypatched) do not reach an isolated child.
    config = KernelConfig(cores=(CoreConfig(name="m", slots=1, cache_slots=0, isolate=False),))
    async with Kernel(config) as k:
        return (await k.llm(k.register("t"), call)).text


@pytest.mark.model
async def test_the_safe_load_path_really_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What an AMX machine gets from the guard (the weights without llama.cpp's extra buffer
    types) loads and answers as the default load does."""
    default = await _ask_paris()
    seen: list[bool] = []
    real = cpu.check

    def safe(lc: object, allow_amx: bool = False) -> LoadPlan:
        seen.append(real(lc, allow_amx=allow_amx).extra_bufts)
        return LoadPlan(False, "test: extra buffer types off")

    monkeypatch.setattr(cpu, "check", safe)
    without = await _ask_paris()
    assert seen == [True]  # the real guard had nothing to change here
    assert "Paris" in default and "Paris" in without, (default, without)


def _on_a_cpu_without_the_builds_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A native AVX-512 build (fabricated facts, so on any architecture) met by a CPU with
    SSE2 only."""
    bare = CpuFacts("x86_64", words("fpu sse sse2"))
    monkeypatch.setattr(CpuFacts, "of_host", classmethod(lambda cls, *a: bare))
    monkeypatch.setattr(LibraryFacts, "of_module", classmethod(lambda cls, lc: lib(NATIVE_SPR)))


@pytest.mark.model
def test_the_engine_refuses_a_build_this_cpu_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typed error before the model is loaded, not a SIGILL."""
    from aios.llm.llamacpp import LlamaCppEngine

    _on_a_cpu_without_the_builds_instructions(monkeypatch)
    with pytest.raises(IncompatibleBuild, match="compiled for instructions"):
        LlamaCppEngine(CoreConfig(slots=1, cache_slots=0))


@pytest.mark.model
def test_aios_chat_says_what_is_wrong_instead_of_crashing(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from typer.testing import CliRunner

    from aios.cli import app
    from aios.cli import run as cli_run  # where chat looks _kernel_config up

    _on_a_cpu_without_the_builds_instructions(monkeypatch)
    real = cli_run._kernel_config

    def in_process(*args: Any, **kwargs: Any) -> Any:  # where the fabricated facts apply
        config = real(*args, **kwargs)
        cores = tuple(dataclasses.replace(c, isolate=False) for c in config.cores)
        return dataclasses.replace(config, cores=cores)

    monkeypatch.setattr(cli_run, "_kernel_config", in_process)
    result = CliRunner().invoke(app, ["chat", "What is the capital of France?"])
    assert result.exit_code == 1, result.output
    assert "compiled for instructions this CPU does not have" in result.output
    assert "pip install --force-reinstall" in result.output
    assert "Traceback" not in result.output
