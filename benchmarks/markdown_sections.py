"""What the benchmark scripts share to record a result in BENCHMARKS.md: the command that
reproduces it, the machine kind a section is kept per, the section replaced in place, the load.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence


def machine_kind(hardware) -> str:
    """``"native-bf16"`` or ``"emulated-bf16"``: sections are kept one per kind of CPU."""
    from keras_maskrcnn.precision import native_bfloat16

    return "native-bf16" if native_bfloat16(hardware) else "emulated-bf16"


def command_line(script: str, argv: Sequence[str], markdown: Optional[str]) -> str:
    """``python benchmarks/SCRIPT ARGS`` without ``--markdown`` and its value."""
    args = " ".join(a for a in argv if not a.startswith("--markdown") and a != markdown)
    return f"python benchmarks/{script} {args}".strip()


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def replace_section(path: str, begin: str, end: str, section: str) -> None:
    """Write ``section`` (which starts with ``begin`` and ends with ``end``) into ``path`` in place
    of the text between an earlier ``begin`` and ``end``, or at the end of the file."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def run_json_worker(command: List[str], env: Dict[str, str], cwd: str, name: str) -> dict:
    """Run a worker process and return the JSON object on the last ``{`` line of its output;
    exit with its stderr when it fails."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])
