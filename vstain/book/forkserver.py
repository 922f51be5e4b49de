"""Notebook kernels forked from one process that has imported the study's libraries already.

Every notebook of the book opens by importing torch, Lightning, pandas, matplotlib and ``vstain``:
3-6 s of a fresh kernel's time on 2 cores before the notebook computes anything, and more in the
cells that import further modules on first use. The pipeline starts one *warm* process per run
(:class:`ForkServer`) that imports :data:`PRELOAD` once and waits; each notebook's kernel is then a
fork of it (:class:`ForkKernelManager`), which finds those modules imported.

A forked kernel computes what a fresh one does (``tests/test_forkserver.py`` compares the two):

- it is ipykernel started by ipykernel's own entry point, in a session (process group) of its own,
  with the environment, working directory and connection file jupyter_client gives any kernel;
- the warm process only imports, with one CPU thread and the inline matplotlib backend that
  ipykernel sets in every kernel, so no thread pool exists when it forks; the kernel then sets
  torch's and the BLAS libraries' threads as a fresh interpreter reads them from its environment
  (:func:`thread_counts`);
- a kernel whose command is not this interpreter's ipykernel, or one asked for while the warm
  process is still importing or is gone, starts afresh as jupyter_client starts it.

The warm process ends with the pipeline, or by itself once the process that started it is gone.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager
from jupyter_client.provisioning import LocalProvisioner

ADDRESS = "VSTAIN_KERNEL_SERVER"  # the environment variable that names the warm process's socket
INLINE = "module://matplotlib_inline.backend_inline"  # ipykernel's default backend (kernelapp.init_gui_pylab)
# What the notebooks import (their import cells), heaviest first; a module that fails to import is
# left for the kernel to import (and fail on) itself.
PRELOAD = (
    "ipykernel.kernelapp", "torch", "lightning", "torchmetrics", "pandas", "scipy.stats", "scipy.ndimage",
    "skimage.measure", "matplotlib.pyplot", "IPython.display",
    "vstain.book.rundir", "vstain.data.stage", "vstain.plots.views", "vstain.training.unet", "vstain.training.wgan",
    "vstain.training.flow", "vstain.evaluate.metrics", "vstain.evaluate.perceptual",
)


# --------------------------------------------------------------------------------------------
# The warm process
# --------------------------------------------------------------------------------------------
def _count(env: dict[str, str], name: str) -> int | None:
    """A thread count from ``env[name]`` (its first field: OpenMP writes one per nesting level)."""
    try:
        n = int(env.get(name, "").split(",")[0])
    except ValueError:
        return None
    return n if n >= 1 else None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _physical_cores() -> int:
    """The machine's physical cores (torch's default thread count), from Linux's CPU topology."""
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def thread_counts(env: dict[str, str]) -> tuple[int, int]:
    """The CPU threads of torch and of the BLAS libraries in a fresh interpreter with environment
    ``env``, as each reads it when it loads: torch ``MKL_NUM_THREADS``, else ``OMP_NUM_THREADS``, else
    the physical cores; OpenBLAS ``OPENBLAS_NUM_THREADS``, else ``GOTO_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else the cores this process may use."""
    torch_threads = _count(env, "MKL_NUM_THREADS") or _count(env, "OMP_NUM_THREADS") or _physical_cores()
    blas = next((n for n in map(lambda k: _count(env, k), ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                                                           "OMP_NUM_THREADS")) if n), None) or _cores()
    return torch_threads, blas


def keep_priority(pid: int = 0, nice: int | None = None) -> None:
    """Give the session of process ``pid`` (0: this one) the process's scheduling priority (or ``nice``).

    A kernel runs in a session of its own, and where Linux groups the CPU time by session
    (autogroup), a session's share follows the session's nice value, not its processes': a kernel
    started from ``nice make book`` would otherwise compete at full weight with everything else."""
    try:
        nice = os.getpriority(os.PRIO_PROCESS, pid) if nice is None else nice
        if nice > 0:
            Path(f"/proc/{pid or 'self'}/autogroup").write_text(str(nice))
    except OSError:  # no autogroup (another OS, or a kernel without it): the process's nice is what counts
        pass


def _become_kernel(request: dict[str, Any]) -> None:
    """In the forked child: become the kernel ``request`` describes; never returns."""
    code = 0
    try:
        os.setsid()  # its own process group, as jupyter_client starts kernels (stopped with killpg)
        keep_priority()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the kernel waits for its own subprocesses
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import threadpoolctl
        import torch

        torch_threads, blas_threads = thread_counts(os.environ)
        torch.set_num_threads(torch_threads)  # its OpenMP and MKL threads
        threadpoolctl.threadpool_limits(blas_threads, user_api="blas")  # numpy's and scipy's OpenBLAS
        sys.argv = [importlib.util.find_spec("ipykernel_launcher").origin, *request["argv"][3:]]  # as under `python -m`
        if os.environ.get("JPY_PARENT_PID"):  # ipykernel read it when the warm process imported it
            sys.argv.append(f"--IPKernelApp.parent_handle={os.environ['JPY_PARENT_PID']}")
        from ipykernel import kernelapp

        kernelapp.launch_new_instance()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the kernel's stderr, then the process ends
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(address: str, parent: int) -> None:
    """Import :data:`PRELOAD`, then fork a kernel for each request on the Unix socket ``address``
    (one JSON line: ``argv``, ``env``, ``cwd``; the reply is the kernel's pid), until ``parent`` is gone."""
    if sys.path and Path(sys.path[0] or ".").resolve() == Path.cwd():
        del sys.path[0]  # as ipykernel's launcher does: a kernel imports nothing from where it was started
    os.environ.setdefault("MPLBACKEND", INLINE)
    with warnings.catch_warnings():  # a warning at import belongs to no notebook
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the kernel that needs it imports it and reports the error
                pass
    gc.freeze()  # what the imports made stays out of the kernels' garbage collections (and unwritten)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # ended kernels are reaped at once; their end is polled by pid
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address + ".tmp")
    server.listen(16)
    os.rename(address + ".tmp", address)  # the socket appears once it accepts
    server.settimeout(1.0)
    while os.getppid() == parent:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        with conn:
            conn.settimeout(30)
            request = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _become_kernel(request)
            conn.sendall(f"{pid}\n".encode())


# --------------------------------------------------------------------------------------------
# The pipeline's side
# --------------------------------------------------------------------------------------------
class ForkServer:
    """The warm process for one pipeline run: :meth:`start` starts it and names its socket in
    :data:`ADDRESS` (inherited by worker processes forked later); :meth:`stop` ends it. Also a
    context manager."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.folder: str | None = None
        self._previous: str | None = None

    @property
    def started(self) -> bool:
        return self.process is not None

    def start(self) -> ForkServer:
        self.folder = tempfile.mkdtemp(prefix="vstain-kernels-")
        self.address = os.path.join(self.folder, "server")
        # one thread while it imports: no OpenMP or BLAS thread pool exists in the process it forks
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "vstain.book.forkserver", self.address, str(os.getpid())],
                                        env=env, stdin=subprocess.DEVNULL)
        self._previous = os.environ.get(ADDRESS)
        os.environ[ADDRESS] = self.address
        return self

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Wait until the warm process serves (its imports done); False if it ended or timed out."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.address):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.process is None:
            return
        if self._previous is None:
            os.environ.pop(ADDRESS, None)
        else:
            os.environ[ADDRESS] = self._previous
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.process = None

    def __enter__(self) -> ForkServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def request_kernel(address: str, argv: list[str], env: dict[str, str], cwd: str, timeout: float = 60.0) -> int | None:
    """Ask the warm process at ``address`` for a kernel: its pid, or None when the warm process
    does not serve (it is still importing, or it is gone) and the kernel is to start afresh."""
    if not os.path.exists(address):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(address)
            conn.sendall((json.dumps({"argv": argv, "env": env, "cwd": cwd}) + "\n").encode())
            reply = conn.makefile("r").readline()
    except OSError:
        return None
    return int(reply) if reply.strip() else None


class ForkedProcess:
    """The :class:`subprocess.Popen` calls jupyter_client makes on a kernel, for a kernel that is
    the warm process's child, not this process's (its exit status is not known here: -1)."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -1
            except PermissionError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkProvisioner(LocalProvisioner):
    """jupyter_client's local provisioner, launching this interpreter's ipykernel as a fork of the
    warm process named by :data:`ADDRESS` when there is one."""

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        address = os.environ.get(ADDRESS)
        ours = len(cmd) >= 3 and cmd[1:3] == ["-m", "ipykernel_launcher"] \
            and os.path.realpath(shutil.which(cmd[0]) or cmd[0]) == os.path.realpath(sys.executable)
        pid = None
        if address and ours:
            cwd = str(kwargs.get("cwd") or os.getcwd())
            env = {**(kwargs.get("env") or os.environ)}
            if not kwargs.get("independent"):
                env["JPY_PARENT_PID"] = str(os.getpid())  # as jupyter_client's launch_kernel sets it
            pid = request_kernel(address, list(cmd), env, cwd)
        if pid is None:
            info = await super().launch_kernel(cmd, **kwargs)
            keep_priority(self.pid)  # jupyter_client starts it in a session of its own
            return info
        self.process = ForkedProcess(pid)
        self.pid = self.pgid = pid  # the kernel's first act is setsid(): its group is its pid
        self.cwd = kwargs.get("cwd", Path.cwd())
        return self.connection_info


class ForkKernelManager(AsyncKernelManager):
    """nbclient's kernel manager, with :class:`ForkProvisioner` for the kernel's process."""

    async def _async_pre_start_kernel(self, **kw: Any):
        if self.provisioner is None:
            self.kernel_id = self.kernel_id or kw.pop("kernel_id", None) or os.urandom(16).hex()
            self.provisioner = ForkProvisioner(kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self)
        return await super()._async_pre_start_kernel(**kw)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
