"""Kernels forked from the warm process (vstain.book.forkserver) against kernels started afresh:
the same outputs, threads from the kernel's own OMP_NUM_THREADS, a fresh kernel when no warm
process answers, and the kernel's process handled as jupyter_client handles its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_notebook

from vstain.book import forkserver, kernel

PROBE = """\
import os, sys
import numpy as np
import torch
import matplotlib
import threadpoolctl
torch.manual_seed(seed)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(), torch.nn.Conv3d(4, 2, 1))
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
x = torch.randn(2, 1, 8, 16, 16)
for _ in range(3):
    loss = (net(x) - x).abs().mean()
    opt.zero_grad(); loss.backward(); opt.step()
blas = sorted({i["user_api"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}.items())
print(repr(loss.item()), repr(float(np.linalg.norm(np.arange(12.0).reshape(3, 4) @ np.ones(4)))))
print(torch.get_num_threads(), blas, matplotlib.get_backend(), os.getcwd(), os.getpgid(0) == os.getpid(),
      sys.argv[0].endswith("ipykernel_launcher.py"), os.getcwd() in sys.path)
"""


def _outputs(path):
    nb = json.loads(path.read_text())
    return ["".join(o.get("text", "")) or o.get("ename") for c in nb["cells"] for o in c.get("outputs", [])]


def _execute(tmp_path, name, threads):
    source = write_notebook(tmp_path / "probe.ipynb", "seed = 0  # weights", PROBE, ("1 / 0", ["raises-exception"]),
                            "print(os.getppid())")
    executed = tmp_path / f"{name}.ipynb"
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    old = os.environ.copy()
    os.environ.update(env)
    try:
        kernel.execute(kernel.Stage("probe", source, "probe"), {"seed": 3}, executed, cwd=tmp_path)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return _outputs(executed)


def test_a_forked_kernel_computes_what_a_fresh_one_does(tmp_path):
    fresh = _execute(tmp_path, "fresh", threads=2)
    with forkserver.ForkServer() as server:
        assert server.wait_ready()
        forked = _execute(tmp_path, "forked", threads=2)
        one = _execute(tmp_path, "forked1", threads=1)
        assert server.process.poll() is None  # it serves the next kernel
        assert int(forked[-1]) == int(one[-1]) == server.process.pid != int(fresh[-1])  # forked from it
    assert forked[:-1] == fresh[:-1]  # the same loss to the last bit, threads, backend, cwd, session, argv
    numbers, setup = fresh[0].splitlines()
    assert setup.startswith("2 [('blas', 2), ('openmp', 2)] module://matplotlib_inline.backend_inline")
    assert setup.endswith("True True False")
    assert one[0].splitlines()[0] == numbers and one[0].splitlines()[1].startswith("1 [('blas', 1), ('openmp', 1)]")
    assert fresh[1] == "ZeroDivisionError"  # a tagged error is recorded in both


def test_without_a_warm_process_the_kernel_starts_afresh(tmp_path):
    server = forkserver.ForkServer().start()
    server.process.kill()
    server.process.wait()
    source = write_notebook(tmp_path / "plain.ipynb", "x = 0  # a value", "import os\nprint(os.getppid(), x)")
    try:
        t0 = time.monotonic()
        kernel.execute(kernel.Stage("plain", source, "plain"), {"x": 5}, tmp_path / "out.ipynb", cwd=tmp_path)
        assert time.monotonic() - t0 < 30  # no wait for a process that will never serve
    finally:
        server.stop()
    assert _outputs(tmp_path / "out.ipynb") == [f"{os.getpid()} 5\n"]  # a kernel of this process's own
    assert forkserver.ADDRESS not in os.environ


def test_a_kernel_asked_for_while_the_warm_process_imports_starts_afresh(tmp_path):
    with forkserver.ForkServer() as server:
        t0 = time.monotonic()
        assert forkserver.request_kernel(server.address, [sys.executable, "-m", "ipykernel_launcher"], {}, "/") is None
        assert time.monotonic() - t0 < 0.5  # not waiting for the imports (seconds)


def test_forked_process_reports_its_end_and_takes_signals():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc = forkserver.ForkedProcess(child.pid)
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    proc.send_signal(signal.SIGKILL)
    child.wait()  # reaped by its parent, as the warm process reaps its kernels
    assert proc.wait(timeout=5) == -1 and proc.poll() == -1


@pytest.mark.parametrize("env, expected", [
    ({"OMP_NUM_THREADS": "3"}, (3, 3)),
    ({"OMP_NUM_THREADS": "2,1", "MKL_NUM_THREADS": "1"}, (1, 2)),  # torch reads MKL's over OpenMP's
    ({"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1"}, (2, 1)),
    ({"OMP_NUM_THREADS": "many"}, (None, None)), ({}, (None, None)), ({"OMP_NUM_THREADS": "0"}, (None, None)),
])
def test_kernel_threads_are_what_a_fresh_interpreter_reads_from_its_environment(env, expected):
    defaults = forkserver._physical_cores(), forkserver._cores()
    assert forkserver.thread_counts(env) == tuple(e or d for e, d in zip(expected, defaults))
