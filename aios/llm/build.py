"""Install llama-cpp-python built for this machine: ``python -m aios.llm.build``.

``make run`` and ``make test`` run this before installing aios. It exists because pip's own
wheel cache keys a built wheel by the sdist's address only: a machine that once built
llama-cpp-python with other ``CMAKE_ARGS`` (or on another CPU, for a ``-march=native`` build)
would silently get that wheel again. Here a wheel is cached under a **build key**: the
llama-cpp-python version, the ``CMAKE_ARGS``, the compiler, what the compiler's
``-march=native`` resolves to on this CPU, the Python and the platform. A key that differs from
the one stamped in the environment means "build (or take the cached wheel of that key) and
install"; the same key costs one compiler call and returns.

The recipe (:func:`cmake_args`): ``-DLLAVA_BUILD=OFF`` (the multimodal part is unused), and on
x86-64 ``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`` in the C and C++ flags, so that a native
build on a CPU that advertises AMX has no AMX code (it faults in many VMs; see
:mod:`aios.llm.cpu`). Everything else stays native. Extra ``CMAKE_ARGS`` from the environment
are appended (and are part of the key).

After installing, a child process loads the new library and :func:`aios.llm.cpu.decide` checks
it against this CPU; a library that crashes there is reported, not left for ``aios run``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from aios.errors import IncompatibleBuild
from aios.llm.cpu import NO_AMX_FLAGS, CpuFacts, LibraryFacts, decide, is_x86

PACKAGE = "llama-cpp-python"
STAMP = ".aios-llama-build"  # in the environment's prefix: the key of what is installed
EXTRA = "embedded"  # the extra of pyproject.toml that pins it


class BuildError(Exception):
    """The build or install failed; the message says what to do."""


def pinned_version(pyproject: Path | None = None) -> str:
    """The ``llama-cpp-python==X`` pin of aios's ``embedded`` extra (written only there): from
    the checkout's pyproject.toml, else from the installed aios's metadata."""
    pyproject = pyproject or Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        deps = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"][EXTRA]
    except FileNotFoundError:
        deps = importlib.metadata.requires("aios") or []
    for dep in deps:
        m = re.fullmatch(r"llama-cpp-python\s*==\s*([\w.]+)\s*(;.*)?", dep.strip())
        if m:
            return m[1]
    raise BuildError(f"aios's {EXTRA!r} extra pins no llama-cpp-python==VERSION")


def cmake_args(machine: str, extra: str = "") -> str:
    """The ``CMAKE_ARGS`` of the default build (scikit-build-core splits them with shlex)."""
    args = ["-DLLAVA_BUILD=OFF"]
    if is_x86(machine):
        args += [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    return " ".join([shlex.join(args), *([extra.strip()] if extra.strip() else [])])


def native_target(driver_output: str) -> tuple[str, ...]:
    """The target flags in a compiler's ``-march=native -###`` output: what native means on
    this CPU (gcc: ``-march=skylake-avx512 -mno-amx-tile ...``; clang: ``-target-cpu X``,
    ``-target-feature +avx2 ...``). Paths and temporary names are left out."""
    flags: list[str] = []
    for line in driver_output.splitlines():
        if "cc1" not in line:
            continue
        try:
            tokens = shlex.split(line)
        except ValueError:
            tokens = line.split()
        for i, tok in enumerate(tokens):
            if tok in ("-target-cpu", "-target-feature", "-tune-cpu") and i + 1 < len(tokens):
                flags.append(f"{tok} {tokens[i + 1]}")
            elif re.fullmatch(r"-m[a-z0-9][\w.=+-]*", tok):
                flags.append(tok)
    return tuple(flags)


@dataclass(frozen=True)
class BuildSpec:
    """Everything the built library depends on; :meth:`key` names its wheel in the cache."""

    version: str
    cmake_args: str
    compiler: str  # the first line of `$CC --version`
    target: tuple[str, ...]  # native_target() of this CPU
    python: str  # e.g. cpython-311
    platform: str  # e.g. linux-x86_64

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.version}-{hashlib.sha256(blob).hexdigest()[:16]}"

    @classmethod
    def here(cls, version: str, env: Mapping[str, str]) -> BuildSpec:
        cc = env.get("CC", "cc")
        try:
            ident = subprocess.run(
                [cc, "--version"], capture_output=True, text=True, timeout=60, check=True
            ).stdout.splitlines()[0]
            driver = subprocess.run(
                [cc, "-march=native", "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            ).stderr
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            raise BuildError(
                f"no working C compiler ({cc}: {e}). llama.cpp is compiled on install: "
                "install a C/C++ toolchain with cmake (Debian/Ubuntu: "
                "sudo apt-get install build-essential cmake), or set CC"
            ) from None
        impl = sys.implementation
        return cls(
            version=version,
            cmake_args=cmake_args(platform.machine(), env.get("CMAKE_ARGS", "")),
            compiler=ident.strip(),
            target=native_target(driver),
            python=f"{impl.name}-{impl.version.major}{impl.version.minor}",
            platform=f"{sys.platform}-{platform.machine()}",
        )


def cache_root(env: Mapping[str, str]) -> Path:
    """Where built wheels are kept: ``$AIOS_WHEEL_CACHE``, else ``~/.cache/aios/wheels``."""
    if env.get("AIOS_WHEEL_CACHE"):
        return Path(env["AIOS_WHEEL_CACHE"])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aios" / "wheels"


def cached_wheel(root: Path, key: str) -> Path | None:
    wheels = sorted((root / key).glob("llama_cpp_python-*.whl"))
    return wheels[0] if wheels else None


def is_current(prefix: Path, key: str) -> bool:
    """Whether the environment holds the build of ``key``: its stamp names the key and the
    installed package's files as they are now (a reinstall by other means voids it)."""
    expected = _stamp_text(key)
    try:
        return expected is not None and (prefix / STAMP).read_text().strip() == expected
    except OSError:
        return False


def _stamp_text(key: str) -> str | None:
    """``KEY VERSION MTIME`` of the installed llama_cpp package; ``None`` if there is none."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.origin is None:
            return None
        mtime = os.stat(spec.origin).st_mtime_ns
        version = importlib.metadata.version(PACKAGE)
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    return f"{key} {version} {mtime}"


def build_wheel(spec: BuildSpec, root: Path, env: Mapping[str, str]) -> Path:
    """Compile the wheel (pip's wheel cache off, so nothing built another way is reused) and
    move it into the cache under its key."""
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"aios: compiling llama.cpp ({PACKAGE}=={spec.version}, about 9 minutes on 2 cores; "
        f"cached under {root / spec.key()})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir"]
        cmd += ["--no-binary", PACKAGE, "-w", tmp, f"{PACKAGE}=={spec.version}"]
        done = subprocess.run(cmd, env={**env, "CMAKE_ARGS": spec.cmake_args})
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if done.returncode or not built:
            raise BuildError(
                f"compiling {PACKAGE}=={spec.version} failed (pip exited {done.returncode}; "
                "its output is above). It needs a C/C++ toolchain with cmake (Debian/Ubuntu: "
                "sudo apt-get install build-essential cmake)"
            )
        final = root / spec.key() / built[0].name
        final.parent.mkdir(exist_ok=True)
        os.replace(built[0], final)  # atomic: a concurrent reader sees all of it or nothing
    return final


def inspect_installed(python: str) -> LibraryFacts:
    """Load the installed library in a child process (a crash there is a message here)."""
    code = (
        "import json, llama_cpp\n"
        "from dataclasses import asdict\n"
        "from aios.llm.cpu import LibraryFacts\n"
        "f = asdict(LibraryFacts.of_module(llama_cpp))\n"
        "f['features'] = sorted(f['features'])\n"
        "print(json.dumps(f))\n"
    )
    # aios itself (installed or not yet) first, then whatever the caller had
    extra = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    path = [str(Path(__file__).resolve().parents[2]), *filter(None, extra)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    if done.returncode:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise BuildError(
            f"the installed {PACKAGE} does not load ({how}): {done.stderr.strip()[-2000:]}"
        )
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return LibraryFacts(raw["version"], frozenset(raw["features"]), raw["has_extra_bufts_switch"])


def install_wheel(wheel: Path) -> None:
    """Replace the installed package by ``wheel`` (whatever its build), then add its missing
    dependencies without reinstalling those already there."""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    for cmd in ([*pip, "--force-reinstall", "--no-deps", str(wheel)], [*pip, str(wheel)]):
        if subprocess.run(cmd).returncode:
            raise BuildError(f"pip could not install {wheel} (its output is above)")
    importlib.invalidate_caches()


def ensure(spec: BuildSpec, *, prefix: Path, root: Path, force: bool = False) -> str:
    """Make the environment at ``prefix`` hold the llama-cpp-python of ``spec``'s key, from
    the wheel cache at ``root`` (compiling into it if needed); returns what was done."""
    key = spec.key()
    if not force and is_current(prefix, key):
        return "up to date"
    wheel = cached_wheel(root, key)
    how = "installed the cached wheel"
    if wheel is None:
        wheel = build_wheel(spec, root, os.environ)
        how = "built and installed"
    install_wheel(wheel)
    lib = inspect_installed(sys.executable)
    try:
        plan = decide(CpuFacts.of_host(), lib)
    except IncompatibleBuild as e:
        raise BuildError(f"the build does not fit this CPU: {e}") from None
    if lib.amx:
        # The compiler turned AMX back on despite -mno-amx-* (not seen so far). The kernel's
        # guard still keeps the weights off the AMX buffer type where the CPU advertises AMX.
        note = plan.warning or "this CPU does not advertise AMX, so none of it runs here"
        print(f"aios: warning: this llama.cpp has AMX kernels ({spec.compiler}): {note}")
    stamp = _stamp_text(key)
    if stamp is None:
        raise BuildError(f"{PACKAGE} is not importable after installing {wheel}")
    try:
        (prefix / STAMP).write_text(stamp + "\n")
    except OSError as e:  # not ours to write (a system Python): checked again next time
        print(f"aios: warning: could not record the build key in {prefix}: {e}")
    return how


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m aios.llm.build [--force]")
        return
    try:
        spec = BuildSpec.here(pinned_version(), os.environ)
        how = ensure(
            spec, prefix=Path(sys.prefix), root=cache_root(os.environ), force="--force" in args
        )
    except BuildError as e:
        print(f"aios: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if how != "up to date":
        print(f"aios: llama.cpp {how}")


if __name__ == "__main__":
    main()
