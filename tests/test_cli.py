"""The command line: help without llama.cpp, clean errors with exit codes, real runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from aios.cli import app

runner = CliRunner()


def test_help_does_not_load_llama_cpp() -> None:
    code = (
        "import sys\n"
        "from aios.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'llama_cpp' not in sys.modules, 'aios --help imported llama.cpp'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "run" in out.stdout and "chat" in out.stdout


@pytest.mark.parametrize("command", ["run", "chat", "agents", "bench"])
def test_every_command_has_help_with_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    if command != "bench":
        assert "Example:" in result.output


def test_bad_input_is_a_clean_error() -> None:
    result = runner.invoke(app, ["chat", "hi", "--max-tokens", "-3"])
    assert result.exit_code == 2
    assert "max_tokens must be a positive integer" in result.output
    assert "Traceback" not in result.output


def test_missing_model_is_a_clean_error() -> None:
    result = runner.invoke(app, ["chat", "hi", "--model", "/no/such/model.gguf"])
    assert result.exit_code == 3
    assert "neither a built-in model" in result.output
    assert "Traceback" not in result.output


def test_unknown_agent_is_a_clean_error() -> None:
    result = runner.invoke(app, ["run", "--agents", "1", "--agent", "nope"])
    assert result.exit_code == 2
    assert "unknown agent 'nope'" in result.output


@pytest.mark.model
def test_chat_answers() -> None:
    result = runner.invoke(app, ["chat", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


@pytest.mark.model
def test_run_agents_end_to_end() -> None:
    result = runner.invoke(app, ["run", "--agents", "3", "--slots", "4"])
    assert result.exit_code == 0, result.output
    assert "3/3 agents done" in result.output
    for kind in ("planner", "writer", "quiz"):
        assert kind in result.output
