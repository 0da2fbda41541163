"""Run torchvision (the numerical reference) in its own virtual environment.

torchvision lives in a separate venv built by ../shared/tools/setup_torchvision_reference.sh
(default /tmp/tvref-venv, or $TVREF_VENV). Tests send numpy arrays in an .npz, run a short
script there, and read the arrays it saves. Tests skip where the environment is absent, and fail
instead where ``KERAS_MASKRCNN_REQUIRE_TORCHVISION=1`` says it must be there (``.ci/run`` sets it
after building the environment, so a broken reference build turns CI red).
"""
import functools
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOOLS = SHARED / "tools"
DATASETS = SHARED / "datasets"
VENV = Path(os.environ.get("TVREF_VENV", "/tmp/tvref-venv"))
PYTHON = VENV / "bin" / "python"


def available() -> bool:
    return PYTHON.exists() and (TOOLS / "tvref.py").exists()


REQUIRE_ENV = "KERAS_MASKRCNN_REQUIRE_TORCHVISION"
ABSENT = f"torchvision reference env absent at {VENV} (../shared/tools/setup_torchvision_reference.sh)"


def requires_torchvision(test):
    """Decorator: run ``test`` where the reference exists; else skip it, or fail it when
    ``KERAS_MASKRCNN_REQUIRE_TORCHVISION=1``."""
    if available():
        return test
    if os.environ.get(REQUIRE_ENV) == "1":
        @functools.wraps(test)
        def fail(*args, **kwargs):
            pytest.fail(f"{REQUIRE_ENV}=1 but the {ABSENT}")

        return fail
    return pytest.mark.skip(reason=ABSENT)(test)


def run(script: str, **inputs: np.ndarray) -> dict:
    """Run ``script`` with torchvision; it sees ``inputs`` (dict of numpy arrays) and fills ``outputs``.

    Inside the script: ``torch``, ``torchvision``, ``np``, ``inputs`` and ``outputs`` are defined;
    put numpy arrays (or tensors) into ``outputs``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "in.npz", **inputs)
        body = textwrap.dedent(script)
        program = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(TOOLS)!r})
            import tvref  # must precede torchvision
            import numpy as np, torch, torchvision
            torch.set_num_threads(2)
            inputs = dict(np.load({str(tmp / 'in.npz')!r}))
            outputs = {{}}
            """
        ) + body + textwrap.dedent(
            f"""
            np.savez({str(tmp / 'out.npz')!r}, **{{k: (v.detach().numpy() if hasattr(v, 'detach') else np.asarray(v)) for k, v in outputs.items()}})
            """
        )
        (tmp / "prog.py").write_text(program)
        proc = subprocess.run([str(PYTHON), str(tmp / "prog.py")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchvision reference failed:\n{proc.stderr[-4000:]}")
        return dict(np.load(tmp / "out.npz"))
