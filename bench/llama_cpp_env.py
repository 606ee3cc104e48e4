"""llama.cpp for side-by-side benchmarks: llama-cpp-python from PyPI, installed
into the benchmark's own virtual environment (bench/.venv-llama-cpp by default),
driven through a worker script run with that environment's Python."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
DEFAULT_VENV = Path(__file__).resolve().parent / ".venv-llama-cpp"


def llama_cpp_python(venv_dir: Path = DEFAULT_VENV) -> Path:
    """The Python of an environment with llama-cpp-python, created on first use
    (building llama.cpp takes several minutes on two cores)."""
    venv_dir = Path(os.environ.get("KVSINK_LLAMA_CPP_VENV", venv_dir))
    python = venv_dir / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {LLAMA_CPP_PYTHON} into {venv_dir} (builds llama.cpp; several minutes)",
          file=sys.stderr)
    venv.create(venv_dir, with_pip=True)
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", LLAMA_CPP_PYTHON, "numpy"],
                   check=True, env=env)
    return python


def run_worker(script: str, *args: str) -> None:
    """Run one of bench/'s *_worker.py scripts under the llama.cpp environment."""
    worker = Path(__file__).resolve().parent / script
    subprocess.run([str(llama_cpp_python()), str(worker), *args], check=True)
