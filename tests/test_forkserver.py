"""Kernels forked from a warm process (vstain.book.forkserver) against kernels started afresh:
the same numbers, environment, threads, figures and exit codes; a fresh kernel when the warm process
is gone or declines; the kernel's process handled as jupyter_client handles its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_notebook

from vstain.book import forkserver, kernel

PROBE = """\
import hashlib, os, sys, subprocess
import numpy as np
import scipy.stats
import torch
import lightning
import matplotlib
import matplotlib.pyplot as plt
import threadpoolctl
torch.manual_seed(seed)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(), torch.nn.Conv3d(4, 2, 1))
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
x = torch.randn(2, 1, 8, 16, 16)
for _ in range(3):
    loss = (net(x) - x).abs().mean()
    opt.zero_grad(); loss.backward(); opt.step()
blas = sorted((i["internal_api"], i["num_threads"], os.path.basename(i["filepath"])) for i in threadpoolctl.threadpool_info())
env = sorted((k, v) for k, v in os.environ.items() if not k.startswith("JPY_"))
print(repr(loss.item()), repr(float(np.linalg.norm(np.arange(12.0).reshape(3, 4) @ np.ones(4)))))
print(torch.get_num_threads(), blas, matplotlib.get_backend(), os.getcwd(), os.getpgid(0) == os.getpid())
print(sys.argv[0].endswith("ipykernel_launcher.py"), os.getcwd() in sys.path, subprocess.run(["false"]).returncode,
      hashlib.sha256(repr(env).encode()).hexdigest())
"""
LOG = 'import logging\nlogging.getLogger("lightning.pytorch").warning("a line of the Lightning log")'
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _outputs(path):
    """Each output's text, error name or data types; stderr only where it holds a log line (a library's
    warning at import shows in a fresh kernel's stderr, in a forked one's pipeline output)."""
    nb = json.loads(path.read_text())
    outs = [("".join(o.get("text", "")) or o.get("ename") or sorted(o.get("data", {})), o.get("name"))
            for c in nb["cells"] for o in c.get("outputs", [])]
    return [text for text, name in outs if name != "stderr" or "the Lightning log" in text]


def _execute(tmp_path, name, env):
    """Run the probe with ``env`` laid over this process's environment (as the pipeline's workers do)."""
    source = write_notebook(tmp_path / "probe.ipynb", "seed = 0  # weights", PROBE, "plt.plot([0, 1]); plt.show()",
                            ("1 / 0", ["raises-exception"]), LOG, "print(os.getppid())")
    executed = tmp_path / f"{name}.ipynb"
    old = os.environ.copy()
    os.environ.update(env)
    try:
        kernel.execute(kernel.Stage("probe", source, "probe"), {"seed": 3}, executed, cwd=tmp_path)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return _outputs(executed)


def test_a_forked_kernel_computes_what_a_fresh_one_does(tmp_path):
    two = {k: "2" for k in THREADS}  # not this session's one thread: the warm process's environment counts
    fresh = _execute(tmp_path, "fresh", two)
    warm = forkserver.WarmKernels([two])
    try:
        env = warm.environment(two)
        server = next(iter(warm.servers.values()))
        assert server.wait_ready()
        pid = server.process.pid
        forked = _execute(tmp_path, "forked", env)
        assert server.process.poll() is None  # it serves the next kernel
        # another environment is declined (a fresh kernel reads its own), and so is every kernel once it is gone
        argv = [sys.executable, "-m", "ipykernel_launcher"]
        assert forkserver.request_kernel(server.address, argv, {**os.environ, **two, "OMP_NUM_THREADS": "1"}, "/") is None
        server.process.kill()
        server.process.wait()
        gone = _execute(tmp_path, "gone", env)
    finally:
        warm.stop()
    assert int(forked[-1]) == pid and int(fresh[-1]) == int(gone[-1]) == os.getpid()  # forked from the warm process
    # the same loss to the last bit, threads of torch and of each BLAS library, backend, cwd, session,
    # argv, sys.path, a subprocess's exit status, environment, a figure, a tagged error, a log line
    assert forked[:-1] == fresh[:-1] == gone[:-1]
    numbers, setup, more = fresh[0].splitlines()
    assert setup.startswith("2 [('openblas', 2, ") and "module://matplotlib_inline.backend_inline" in setup
    assert setup.endswith("True") and more.startswith("True False 1 ")
    assert fresh[1] == ["image/png", "text/plain"] and fresh[2] == "ZeroDivisionError"
    assert fresh[3] == "a line of the Lightning log\n"  # in the cell that logged it


def test_a_kernel_asked_for_while_the_warm_process_imports_starts_afresh(tmp_path):
    with forkserver.ForkServer() as server:
        argv = [sys.executable, "-m", "ipykernel_launcher"]
        assert forkserver.request_kernel(server.address, argv, dict(os.environ), "/") is None
    assert server.process is None  # stopped


def test_forked_process_reports_its_end_and_takes_signals():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc = forkserver.ForkedProcess(child.pid)
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    proc.send_signal(signal.SIGKILL)
    child.wait()  # reaped by its parent, as the warm process reaps its kernels
    assert proc.wait(timeout=5) == -1 and proc.poll() == -1


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no Linux autogroup here")
def test_a_session_gets_its_process_priority():
    child = subprocess.Popen(["nice", "-n", "7", sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)
    try:
        for _ in range(100):  # until nice has set the priority and started python
            if os.getpriority(os.PRIO_PROCESS, child.pid) == 7:
                break
            time.sleep(0.01)
        forkserver.keep_priority(child.pid)
        assert Path(f"/proc/{child.pid}/autogroup").read_text().strip().endswith("nice 7")
    finally:
        child.kill()
        child.wait()
