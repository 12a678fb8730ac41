"""Run model-written Python in isolation and say how it ended.

Each run is a fresh interpreter (`python -I`) in new PID, mount, network, IPC and UTS namespaces
(`unshare`; a user namespace too when not root), started by `sandbox_init.py` as PID 1:

- files: the working directory is a size-limited tmpfs on /tmp (host /tmp and /dev/shm hidden);
  Landlock (where the kernel has it) allows reading only the interpreter and system libraries and
  writing only /tmp; as root the program runs under a spare uid, so 0600 files stay closed even
  without Landlock, and directories like /root are masked, not opened;
- network: an empty network namespace (not even loopback is up), plus Landlock's TCP rules;
- processes: its own PID namespace (it sees and signals only itself; everything it started dies
  with it), RLIMIT_NPROC on a uid nothing else uses, Landlock's signal scope;
- resources: CPU seconds, address space, file size, open files, no core dumps; a wall-clock
  watchdog in the parent that kills the whole namespace; stdout/stderr read with a cap;
- verdict: "passed" only if the program ran to its last line and exited 0, which the runner
  reports by writing a per-run random token on a private descriptor. `sys.exit(0)` or
  `os._exit(0)` half way, or printing "PASSED", is "failed".

The layers this machine gives are probed once and listed by `Sandbox.layers` (and by
`qwen2 synth sandbox`). What it does not defend against: a program that deliberately walks the
runner's stack for the token, kernel exploits, and CPU/memory side channels.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

INIT = Path(__file__).with_name("sandbox_init.py")
VERDICTS = ("passed", "failed", "timeout", "memory", "crashed", "killed")
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE, signal.SIGSYS}

# The program runs inside this, so that the token never appears in a file it can read and only a
# run that reaches the end writes it. SystemExit propagates: exit(0) half way is not a pass.
RUNNER = """\
import os


def _run():
    token = os.read(3, 256)
    os.close(3)
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
    os.write(4, token)
    os.close(4)


_run()
"""


class SandboxError(RuntimeError):
    """The sandbox cannot run on this machine (not Linux, no `unshare`, namespaces refused)."""


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024  # address space of the interpreter (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    tmp_mb: int = 64  # its whole working directory (tmpfs size)
    processes: int = 32  # processes and threads at once
    open_files: int = 64
    output_bytes: int = 1 << 20  # kept of stdout and of stderr each; the rest is read and dropped

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_mb", "file_mb", "tmp_mb", "processes", "open_files",
                     "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {getattr(self, name)}")


@dataclass
class Result:
    verdict: str  # one of VERDICTS
    stdout: str
    stderr: str
    exit_code: int | None = None
    signal: int | None = None
    seconds: float = 0.0
    cpu_seconds: float | None = None
    truncated: bool = False  # output beyond Limits.output_bytes was dropped
    detail: str = ""  # why, in words

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"


@dataclass
class _Stream:
    limit: int
    data: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class Sandbox:
    """Runs programs under `limits`. Reuse one: the probe of what the machine allows runs once."""

    def __init__(self, limits: Limits = Limits(), *, site_packages: bool = False) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError("the sandbox needs Linux namespaces; this is " + sys.platform)
        self.unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
        if self.unshare is None:
            raise SandboxError("the sandbox needs `unshare` (util-linux), which is not installed")
        self.limits = limits
        self.site_packages = site_packages
        self.root = os.geteuid() == 0
        self._layers: list[str] | None = None

    # ------------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """What isolates a program here, probed by running one."""
        if self._layers is None:
            result, report = self._run("import sys\n", {}, self.limits)
            if not result.passed:
                raise SandboxError(f"the sandbox does not start on this machine: {result.detail}\n{result.stderr}")
            self._layers = self._describe(report)
        return self._layers

    def run(self, program: str, *, files: dict[str, str] | None = None, limits: Limits | None = None) -> Result:
        """Run `program` (Python source) with `files` (name -> text) beside it in its working
        directory. Never raises for anything the program does; SandboxError if the sandbox
        itself cannot start."""
        self.layers  # noqa: B018 -- probe first, so a machine without namespaces fails loudly once
        return self._run(program, files or {}, limits or self.limits)[0]

    # ------------------------------------------------------------------------------------------

    def _describe(self, report: dict) -> list[str]:
        layers = ["namespaces: pid, mount, network, ipc, uts" + ("" if self.root else ", user"),
                  "rlimits: cpu, address space, file size, open files, processes, no core",
                  "working directory: tmpfs on /tmp (host /tmp, /dev/shm hidden)",
                  "wall-clock watchdog, output caps, completion token"]
        layers.append("identity: spare uid, no capabilities" if self.root else "identity: no capabilities")
        abi = report.get("landlock_abi", 0)
        if abi:
            parts = ["files"] + (["tcp"] if abi >= 4 else []) + (["signals, abstract sockets"] if abi >= 6 else [])
            layers.append(f"landlock ABI {abi}: " + ", ".join(parts))
        else:
            layers.append("landlock: not available (files are protected by the uid and mount masks only)")
        return layers

    def _job(self, files: dict[str, str], limits: Limits, token: str, report_fd: int) -> dict:
        python = sys.executable
        prefixes = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                         sys.base_exec_prefix)})
        readable = prefixes + [os.path.dirname(python), os.path.dirname(os.path.realpath(python)),
                               "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
                               "/dev/urandom", "/dev/random", "/dev/zero", "/proc"]
        uid = _spare_uid() if self.root else None
        processes = limits.processes if self.root else limits.processes + _processes_of(os.getuid())
        argv = [python, "-I"] + ([] if self.site_packages else ["-S"]) + ["-X", "utf8", "runner.py"]
        return {"files": {**files, "runner.py": RUNNER}, "argv": argv, "token": token, "report_fd": report_fd,
                "uid": uid, "readable": readable, "readable_dirs": prefixes, "landlock": True,
                "env": {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"},
                "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_mb << 20,
                           "file_bytes": limits.file_mb << 20, "tmp_bytes": limits.tmp_mb << 20,
                           "open_files": limits.open_files, "processes": processes}}

    def _run(self, program: str, files: dict[str, str], limits: Limits) -> tuple[Result, dict]:
        for name in files:
            if "/" in name or name in ("", ".", "..", "runner.py", "program.py"):
                raise ValueError(f"sandbox file name {name!r}: plain names only, not runner.py or program.py")
        token = secrets.token_hex(16)
        report_r, report_w = os.pipe()
        job = self._job({**files, "program.py": program}, limits, token, report_w)
        command = [self.unshare, "--fork", "--kill-child", "--pid", "--mount-proc", "--mount", "--net", "--ipc",
                   "--uts"] + ([] if self.root else ["--user", "--map-root-user"])
        command += [sys.executable, "-I", "-S", str(INIT)]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(report_w,), env={}, start_new_session=True)
        finally:
            os.close(report_w)
        streams = {proc.stdout.fileno(): _Stream(limits.output_bytes), proc.stderr.fileno(): _Stream(limits.output_bytes),
                   report_r: _Stream(1 << 16)}
        timed_out = False
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the init process died at once; its stderr says why
        with selectors.DefaultSelector() as selector:
            for fd in streams:
                selector.register(fd, selectors.EVENT_READ)
            deadline = started + limits.wall_seconds
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not timed_out:
                    timed_out = True
                    _kill(proc)
                    deadline = time.monotonic() + 5.0  # the namespace is gone; drain what is left
                    continue
                if remaining <= 0:
                    break
                for key, _ in selector.select(timeout=remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        streams[key.fd].add(chunk)
                    else:
                        selector.unregister(key.fd)
        _kill(proc)  # no-op when it has ended; otherwise nothing may outlive the run
        proc.wait()
        os.close(report_r)
        proc.stdout.close()
        proc.stderr.close()
        seconds = time.monotonic() - started
        stdout, stderr, report_stream = list(streams.values())
        report = _parse_report(report_stream.text())
        if "setup_error" in report:
            raise SandboxError(f"the sandbox could not be set up: {report['setup_error']}")
        result = Result("failed", stdout.text(), stderr.text(), exit_code=report.get("exit"),
                        signal=report.get("signal"), seconds=seconds, cpu_seconds=report.get("cpu_seconds"),
                        truncated=bool(stdout.dropped or stderr.dropped))
        result.verdict, result.detail = _verdict(result, report, timed_out, limits)
        return result, report


def _verdict(result: Result, report: dict, timed_out: bool, limits: Limits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"still running after {limits.wall_seconds:g} s (wall clock); killed"
    if not report:
        return "killed", "the sandbox ended without a report (killed from outside?)"
    sig = result.signal
    if sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and (report.get("cpu_seconds") or 0) >= limits.cpu_seconds):
        return "timeout", f"used its {limits.cpu_seconds} s of CPU time"
    if sig in CRASH_SIGNALS:
        return "crashed", f"died of {signal.Signals(sig).name}"
    if sig is not None:
        return "killed", f"killed by {signal.Signals(sig).name}"
    if result.exit_code == 0:
        if report.get("completed"):
            return "passed", "ran to the end and exited 0"
        return "failed", "exited 0 before reaching the end of the program"
    last = result.stderr.strip().splitlines()[-1:] or [""]
    if last[0].startswith("MemoryError"):
        return "memory", f"ran out of its {limits.memory_mb} MB of address space"
    return "failed", last[0][:200] or f"exit code {result.exit_code}"


def _parse_report(text: str) -> dict:
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL `unshare` and its process group; --kill-child takes PID 1 of the namespace with it,
    and the kernel then kills every process left inside."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _spare_uid() -> int:
    """A uid no account and no running process uses, so RLIMIT_NPROC counts only this run's processes."""
    while True:
        uid = random.randrange(200_000, 2_000_000_000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if _processes_of(uid) == 0:
                return uid


def _processes_of(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count
