"""Notebook kernels forked from a process that has imported the study's libraries already.

Every notebook of the book opens by importing torch, Lightning, pandas, matplotlib and ``vstain``:
3-6 s of a fresh kernel on 2 cores before the notebook computes anything, and more in the cells that
import further modules on first use. The pipeline starts a *warm* process (:class:`ForkServer`) that
imports :data:`PRELOAD` once and waits; each notebook's kernel is then a fork of it
(:class:`ForkKernelManager`), which finds those modules imported.

A forked kernel is the kernel a fresh start would give (``tests/test_forkserver.py`` compares them):

- ipykernel started by its own entry point, in a session (process group) of its own, with the
  connection file, working directory and environment jupyter_client gives any kernel;
- the warm process runs with the kernels' environment, CPU thread variables included (one warm
  process per thread setting, :class:`WarmKernels`), so every library read at import what a fresh
  kernel's reads; it only imports (no thread pool of torch's exists when it forks; OpenBLAS stops its
  threads before a fork and starts them again after), with the inline matplotlib backend ipykernel
  sets in every kernel; a kernel whose environment differs from the warm process's, or whose command
  is not this interpreter's ipykernel, starts afresh;
- the one difference: a warning a library prints while it is imported appears once, in the
  pipeline's output, instead of in the first cell of every notebook that imports it.

A kernel asked for while the warm process still imports (the first notebook of a run) starts
afresh, as do all once the warm process is gone. Kernels end with their warm process, and it with
the pipeline.
"""
from __future__ import annotations

import errno
import gc
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager
from jupyter_client.provisioning import LocalProvisioner

ADDRESS = "VSTAIN_KERNEL_SERVER"  # the environment variable naming the warm process's socket to a kernel manager
INLINE = "module://matplotlib_inline.backend_inline"  # ipykernel's default backend (kernelapp.init_gui_pylab)
# What the notebooks import (their import cells). ipykernel first: it decides what tqdm and
# matplotlib see of the notebook front end. A module that fails to import is left to the kernel.
PRELOAD = (
    "ipykernel.kernelapp", "torch", "lightning", "torchmetrics", "pandas", "scipy.stats", "scipy.ndimage",
    "skimage.measure", "matplotlib.pyplot", "IPython.display",
    "vstain.book.rundir", "vstain.data.stage", "vstain.plots.views", "vstain.training.unet", "vstain.training.wgan",
    "vstain.training.flow", "vstain.evaluate.metrics", "vstain.evaluate.perceptual",
)
# Environment variables that may differ between a kernel and its warm process: the kernel manager's own
# (the socket's name is in neither: the warm process starts without it, the provisioner takes it out).
PER_KERNEL = ("JPY_PARENT_PID", "JPY_SESSION_NAME")


def keep_priority(pid: int = 0, nice: int | None = None) -> None:
    """Give the session of process ``pid`` (0: this one) the process's scheduling priority (or ``nice``).

    A kernel runs in a session of its own, and where Linux groups the CPU time by session
    (autogroup), a session's share follows the session's nice value, not its processes': a kernel
    started from ``nice make book`` would otherwise compete at full weight with everything else.
    Linux lets a process without privileges set it once per 100 ms: a refused write is retried."""
    try:
        nice = os.getpriority(os.PRIO_PROCESS, pid) if nice is None else nice
    except OSError:
        return
    if nice <= 0:
        return
    for _ in range(20):
        try:
            Path(f"/proc/{pid or 'self'}/autogroup").write_text(str(nice))
            return
        except OSError as exc:  # no autogroup (another OS, or a kernel without it): the process's nice counts
            if exc.errno != errno.EAGAIN:
                return
            time.sleep(0.1)


def _same_environment(request: dict[str, str], base: dict[str, str]) -> bool:
    drop = set(PER_KERNEL)
    return {k: v for k, v in request.items() if k not in drop} == {k: v for k, v in base.items() if k not in drop}


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is when it writes: in a kernel, the cell's output."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _log_to_the_kernel() -> None:
    """Point the log handlers that libraries bound to this process's stderr when the warm process
    imported them (Lightning's) at the kernel's, as a fresh kernel's handlers are bound."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers):
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setStream(_CurrentStderr())


def _become_kernel(request: dict[str, Any], added: dict[str, str]) -> None:
    """In the forked child: become the kernel ``request`` describes (``added``: what the imports put
    in the environment, as they would in a fresh kernel); never returns."""
    code = 0
    try:
        os.setsid()  # its own process group, as jupyter_client starts kernels (stopped with killpg)
        keep_priority()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the kernel waits for its own subprocesses
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.clear()
        os.environ.update({**added, **request["env"]})
        os.chdir(request["cwd"])
        sys.argv = [importlib.util.find_spec("ipykernel_launcher").origin, *request["argv"][3:]]  # as under `python -m`
        # ipykernel read JPY_PARENT_PID when the warm process imported it: the kernel watches the
        # warm process instead, and ends when it does
        sys.argv.append(f"--IPKernelApp.parent_handle={os.getppid()}")
        _log_to_the_kernel()
        from ipykernel import kernelapp

        kernelapp.launch_new_instance()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the kernel's stderr, then the process ends
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(address: str, parent: int) -> None:
    """Import :data:`PRELOAD`, then fork a kernel for each request on the Unix socket ``address``
    (one JSON line: ``argv``, ``env``, ``cwd``; the reply is the kernel's pid, or an empty line when
    the kernel's environment is not this process's), until ``parent`` is gone or SIGTERM."""
    if sys.path and Path(sys.path[0] or ".").resolve() == Path.cwd():
        del sys.path[0]  # started with -m from the pipeline's folder: import nothing from there, as a kernel
    base = dict(os.environ)
    os.environ.setdefault("MPLBACKEND", INLINE)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the kernel that needs it imports it and reports the error
            pass
    added = {k: v for k, v in os.environ.items() if k not in base}
    gc.freeze()  # what the imports made stays out of the kernels' garbage collections (and unwritten)
    sys.stdout.flush()
    sys.stderr.flush()
    kernels: list[int] = []
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # ended kernels are reaped at once; their end is polled by pid
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address + ".tmp")
    server.listen(16)
    os.rename(address + ".tmp", address)  # the socket appears once it accepts
    server.settimeout(1.0)
    try:
        while os.getppid() == parent:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                try:
                    conn.settimeout(30)
                    request = json.loads(conn.makefile("r").readline())
                    if not _same_environment(request["env"], base):
                        conn.sendall(b"\n")  # a fresh kernel reads its own environment
                        continue
                except (OSError, ValueError, KeyError):
                    continue
                pid = os.fork()
                if pid == 0:
                    server.close()
                    conn.close()
                    _become_kernel(request, added)
                try:
                    conn.sendall(f"{pid}\n".encode())
                    kernels.append(pid)
                except OSError:  # the kernel manager gave up waiting and starts one afresh
                    os.kill(pid, signal.SIGKILL)
    finally:
        for pid in kernels:  # a kernel whose notebook was not ended (the pipeline stopped)
            if _parent_of(pid) == os.getpid():  # still ours: an ended kernel's pid may be another's by now
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass


def _parent_of(pid: int) -> int | None:
    """The parent of process ``pid``, or None when there is no such process (or no /proc to ask)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# The pipeline's side
# --------------------------------------------------------------------------------------------
class ForkServer:
    """A warm process whose environment is this process's with ``env`` laid over it (the kernels'
    thread variables): :meth:`start`, :meth:`wait_ready`, :meth:`stop`; also a context manager."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.folder: str | None = None
        self.address = ""

    def start(self) -> ForkServer:
        self.folder = tempfile.mkdtemp(prefix="vstain-kernels-")
        self.address = os.path.join(self.folder, "server")
        env = {k: v for k, v in {**os.environ, **self.env}.items() if k != ADDRESS}
        self.process = subprocess.Popen([sys.executable, "-m", "vstain.book.forkserver", self.address, str(os.getpid())],
                                        env=env, stdin=subprocess.DEVNULL)
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
        if self.process.poll() is None:
            self.process.terminate()  # it ends the kernels it forked that still run
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.process = None

    def __enter__(self) -> ForkServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class WarmKernels:
    """The pipeline's warm processes, one per thread setting of its kernels (``settings``: the
    environments the kernels can get), all started when the first kernel needs one (then they import
    side by side): :meth:`environment` gives a kernel's environment its warm process's address."""

    def __init__(self, settings: list[dict[str, str]]):
        self.settings = [dict(env) for env in settings]
        self.servers: dict[tuple, ForkServer] = {}

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        if not self.servers:
            for setting in self.settings:
                self.servers.setdefault(tuple(sorted(setting.items())), ForkServer(setting).start())
        key = tuple(sorted(env.items()))
        if key not in self.servers:
            self.servers[key] = ForkServer(env).start()
        return {**env, ADDRESS: self.servers[key].address}

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def request_kernel(address: str, argv: list[str], env: dict[str, str], cwd: str) -> int | None:
    """Ask the warm process at ``address`` for a kernel: its pid, or None when it does not serve
    (still importing, or gone) or declines (another environment), and the kernel is to start afresh."""
    if not os.path.exists(address):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(address)
            conn.sendall((json.dumps({"argv": argv, "env": env, "cwd": cwd}) + "\n").encode())
            reply = conn.makefile("r").readline()
        return int(reply) if reply.strip() else None
    except (OSError, ValueError):
        return None


class ForkedProcess:
    """The :class:`subprocess.Popen` calls jupyter_client makes on a kernel, for a kernel that is
    the warm process's child, not this process's (its exit status is not known here: -1). It has
    ended when its pid no longer belongs to a child of the same parent (pids are reused)."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None
        self.parent = _parent_of(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            if Path("/proc").is_dir():
                if self.parent is None or _parent_of(self.pid) != self.parent:
                    self.returncode = -1
            else:  # no /proc: whether the pid is taken at all
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
        if self.poll() is None:  # an ended kernel's pid may be another process's by now
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkProvisioner(LocalProvisioner):
    """jupyter_client's local provisioner, launching this interpreter's ipykernel as a fork of the
    warm process named by :data:`ADDRESS` when there is one."""

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        env = {**(kwargs.get("env") or os.environ)}
        address = env.pop(ADDRESS, None)  # the kernel's environment is what it would be without a warm process
        kwargs["env"] = env
        ours = len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1:3] == ["-m", "ipykernel_launcher"]
        pid = None
        if address and ours:
            cwd = str(kwargs.get("cwd") or os.getcwd())
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


    async def send_signal(self, signum: int) -> None:
        if isinstance(self.process, ForkedProcess) and self.process.poll() is not None:
            return  # ended: its process group's id may be another's by now
        await super().send_signal(signum)


class ForkKernelManager(AsyncKernelManager):
    """nbclient's kernel manager, with :class:`ForkProvisioner` for the kernel's process."""

    async def _async_pre_start_kernel(self, **kw: Any):
        if self.provisioner is None:
            self.kernel_id = self.kernel_id or kw.pop("kernel_id", None) or os.urandom(16).hex()
            self.provisioner = ForkProvisioner(kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self)
        return await super()._async_pre_start_kernel(**kw)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
