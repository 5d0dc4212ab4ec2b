"""Will this llama.cpp build run on this CPU? Decided before the first decode, never by crashing.

Two ways a llama.cpp library kills the process without a word:

- **AMX advertised but not usable.** A ``-march=native`` build on a CPU that advertises AMX
  (Sapphire Rapids and later) compiles ggml's AMX matmul and, at load, repacks the weights into
  the AMX "extra" buffer type. In many VMs the first tile instruction (``ldtilecfg``) then takes
  a general protection fault (llama.cpp issue 20824): a bare segfault at the first decode. The
  weights stay off that buffer type when the model is loaded with ``use_extra_bufts = false``,
  and then no AMX code runs at all.
- **A build for another CPU.** A native build copied to (or cached for) a machine whose CPU
  lacks an instruction set it was compiled with dies of SIGILL.

:func:`decide` is pure: it sees the CPU's flags and the library's compiled-in features (both
fabricated in tests) and says how to load the model, or why not to. :func:`check` gathers the
real facts. The default build (``python -m aios.llm.build``) compiles with AMX switched off, so
for it the answer is always "load as usual"; the guard protects every other build.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aios.errors import IncompatibleBuild

# ggml's name for a compiled-in x86 feature (llama_print_system_info) -> the /proc/cpuinfo flag
# the CPU must advertise for it. AMX_INT8 is not here: its code checks at run time.
X86_FEATURE_FLAGS: dict[str, str] = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
}
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
# What the default build adds to CMAKE_C_FLAGS / CMAKE_CXX_FLAGS on x86-64 (aios.llm.build).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def rebuild_command(version: str) -> str:
    """The one command that replaces the installed llama.cpp with a build this guard accepts."""
    return (
        f"CMAKE_ARGS=\"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'\" "
        f"pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python=={version}"
    )


def is_x86(machine: str) -> bool:
    """``machine`` as ``platform.machine()`` spells it."""
    return machine.lower() in ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class CpuFacts:
    """What the CPU advertises. ``flags`` is empty where they cannot be read (not Linux):
    then nothing is checked, as nothing is known."""

    machine: str
    flags: frozenset[str]
    model: str = ""  # e.g. "Intel(R) Xeon(R) Processor @ 2.00GHz"; for reports

    @property
    def is_x86(self) -> bool:
        return is_x86(self.machine)

    @classmethod
    def of_host(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFacts:
        try:
            fields = cpuinfo_fields(cpuinfo.read_text(errors="replace"))
        except OSError:
            fields = {}
        return cls(
            platform.machine(),
            frozenset(fields.get("flags", "").split()),
            fields.get("model name", ""),
        )


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The first core's ``key : value`` lines of /proc/cpuinfo (every core advertises the
    same flags)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the blank line after the first core
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


@dataclass(frozen=True)
class LibraryFacts:
    """What the loaded llama.cpp was compiled with (``features``: ggml's names of the CPU
    features that are on, from ``llama_print_system_info``), and whether its model parameters
    have the ``use_extra_bufts`` switch."""

    version: str
    features: frozenset[str]
    has_extra_bufts_switch: bool

    @property
    def amx(self) -> bool:
        return "AMX_INT8" in self.features

    @classmethod
    def of_module(cls, lc: Any) -> LibraryFacts:
        info = lc.llama_print_system_info().decode(errors="replace")
        fields = {name for name, *_ in lc.llama_model_params._fields_}
        return cls(
            getattr(lc, "__version__", "?"),
            parse_system_info(info),
            "use_extra_bufts" in fields,
        )


def parse_system_info(text: str) -> frozenset[str]:
    """``"CPU : SSE3 = 1 | AVX = 1 | AMX_INT8 = 1 | ..."`` -> the features that are 1."""
    return frozenset(m[1] for m in re.finditer(r"\b([A-Z][A-Z0-9_]*) = 1\b", text))


@dataclass(frozen=True)
class LoadPlan:
    """How to load the model: ``extra_bufts`` is ``use_extra_bufts``; ``warning`` (if any)
    says once, in the log, what the guard changed and why."""

    extra_bufts: bool = True
    warning: str | None = None


def decide(cpu: CpuFacts, lib: LibraryFacts, *, allow_amx: bool = False) -> LoadPlan:
    """Pure: how to load a model with this library on this CPU, or :class:`IncompatibleBuild`
    with the reason and the command that fixes it. ``allow_amx`` (the core's ``amx`` setting)
    trusts AMX where the CPU advertises it."""
    if not cpu.is_x86 or not cpu.flags:
        return LoadPlan()
    missing = sorted(
        f for f, flag in X86_FEATURE_FLAGS.items() if f in lib.features and flag not in cpu.flags
    )
    if missing:
        raise IncompatibleBuild(
            f"this llama.cpp (llama-cpp-python {lib.version}) was compiled for instructions "
            f"this CPU does not have ({', '.join(missing)}): it was built on or for another "
            f"machine and would die of an illegal instruction. Rebuild it here: "
            f"{rebuild_command(lib.version)}"
        )
    if not lib.amx or not (cpu.flags & AMX_FLAGS) or allow_amx:
        return LoadPlan()
    if lib.has_extra_bufts_switch:
        return LoadPlan(
            extra_bufts=False,
            warning=(
                "this llama.cpp has AMX kernels and the CPU advertises AMX, which faults in "
                "many VMs (llama.cpp issue 20824): loading the weights without llama.cpp's "
                "extra buffer types, so no AMX code runs (set amx = true on the core to use "
                f"it anyway, or rebuild without it: {rebuild_command(lib.version)})"
            ),
        )
    raise IncompatibleBuild(
        f"this llama.cpp (llama-cpp-python {lib.version}) has AMX kernels and the CPU "
        "advertises AMX, which faults in many VMs at the first decode (llama.cpp issue 20824), "
        "and this version cannot keep the weights off the AMX buffer type. Rebuild it without "
        f"AMX: {rebuild_command(lib.version)} (or set amx = true on the core to try AMX)"
    )


def check(lc: Any, *, allow_amx: bool = False) -> LoadPlan:
    """:func:`decide` on the real CPU and the imported ``llama_cpp`` module."""
    return decide(CpuFacts.of_host(), LibraryFacts.of_module(lc), allow_amx=allow_amx)
