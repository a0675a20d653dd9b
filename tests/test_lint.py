"""The code base stays ruff-clean (lint and format)."""

import subprocess

import pytest

from tests.helpers import REPO, tool


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
    result = subprocess.run([tool("ruff"), *command], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
