"""The repository's Dockerfile read as instructions: one parser for every test that checks the image.

Continuation lines are joined and comments dropped; ``runtime_stage()`` is the last stage, the image
that runs (tests/deploy/test_deploy.py, tests/kserve/kserve_replay.py, tests/reliability/test_secure_defaults.py).
"""
from __future__ import annotations

import re

from paths import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage (the image that runs)."""
    instructions = dockerfile_instructions()
    start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[start:]
