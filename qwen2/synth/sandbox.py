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

    def __init__(self, limits: Limits = Limits(), *, site_packages: bool = False,
                 allow_without_landlock: bool = False) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError("the sandbox needs Linux namespaces; this is " + sys.platform)
        self.unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
        if self.unshare is None:
            raise SandboxError("the sandbox needs `unshare` (util-linux), which is not installed")
        self.limits = limits
        self.site_packages = site_packages
        self.allow_without_landlock = allow_without_landlock
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
            if not self.root and not report.get("landlock_abi") and not self.allow_without_landlock:
                # without root there is no spare uid: the program runs as you, and only Landlock
                # keeps it from your files
                raise SandboxError("this kernel has no Landlock, and without root the sandboxed program would run "
                                   "as your own user with write access to your files; run as root, enable Landlock "
                                   "(Linux >= 5.13, lsm=landlock), or pass allow_without_landlock=True to accept that")
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
                  "cgroup: memory and processes of the whole sandbox" if report.get("cgroup") else
                  "cgroup: none (memory is limited per process only)",
                  "working directory: tmpfs on /tmp (host /tmp, /dev/shm hidden)",
                  "wall-clock watchdog, output caps, completion token"]
        layers.append("identity: spare uid, no capabilities" if self.root else "identity: no capabilities")
        abi = report.get("landlock_abi", 0)
        if abi:
            parts = ["files"] + (["tcp"] if abi >= 4 else []) + (["signals, abstract sockets"] if abi >= 6 else [])
            layers.append(f"landlock ABI {abi}: " + ", ".join(parts))
        else:
            layers.append("landlock: not available (files are protected by the spare uid and mount masks only)"
                          if self.root else "landlock: not available (NOT protecting your files: allowed explicitly)")
        return layers

    def _job(self, files: dict[str, str], limits: Limits, token: str, report_fd: int,
             cgroup: "_Cgroup | None") -> dict:
        python = sys.executable
        prefixes = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                         sys.base_exec_prefix)})
        readable = prefixes + [os.path.dirname(python), os.path.dirname(os.path.realpath(python)),
                               "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
                               "/dev/urandom", "/dev/random", "/dev/zero", "/proc"]
        uid = _spare_uid() if self.root else None
        # (without root, RLIMIT_NPROC counts in the new user namespace: only the sandbox's processes)
        processes = limits.processes
        argv = [python, "-I"] + ([] if self.site_packages else ["-S"]) + ["-X", "utf8", "runner.py"]
        return {"files": {**files, "runner.py": RUNNER}, "argv": argv, "token": token, "report_fd": report_fd,
                "uid": uid, "readable": readable, "readable_dirs": prefixes, "landlock": True,
                "cgroup_procs": cgroup.procs_files if cgroup else [],
                "env": {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"},
                "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_mb << 20,
                           "file_bytes": limits.file_mb << 20, "tmp_bytes": limits.tmp_mb << 20,
                           "open_files": limits.open_files, "processes": processes}}

    def _run(self, program: str, files: dict[str, str], limits: Limits) -> tuple[Result, dict]:
        for name, text in files.items():
            if not isinstance(name, str) or "/" in name or name in ("", ".", "..", "runner.py", "program.py"):
                raise ValueError(f"sandbox file name {name!r}: plain names only, not runner.py or program.py")
            if not isinstance(text, str):
                raise ValueError(f"sandbox file {name!r}: the content must be text, not {type(text).__name__}")
        if not isinstance(program, str):
            raise ValueError(f"the program must be Python source text, not {type(program).__name__}")
        token = secrets.token_hex(16)
        cgroup = _Cgroup.create(limits) if self.root else None
        report_r, report_w = os.pipe()
        proc = None
        try:
            job = json.dumps(self._job({**files, "program.py": program}, limits, token, report_w, cgroup)).encode()
            command = [self.unshare, "--fork", "--kill-child", "--pid", "--mount-proc", "--mount", "--net", "--ipc",
                       "--uts"] + ([] if self.root else ["--user", "--map-root-user"])
            command += [sys.executable, "-I", "-S", str(INIT)]
            started = time.monotonic()
            try:
                proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        pass_fds=(report_w,), env={}, start_new_session=True)
            finally:
                os.close(report_w)
            streams, timed_out = self._collect(proc, job, report_r, limits, started)
            seconds = time.monotonic() - started
        finally:
            if proc is not None:
                _kill(proc)  # nothing may outlive the run, whatever happened
                proc.wait()
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    pipe.close()
            os.close(report_r)
            oom = cgroup.oom_killed() if cgroup else False
            if cgroup:
                cgroup.remove()
        stdout, stderr, report_stream = streams
        report = _parse_report(report_stream.text())
        if "setup_error" in report:
            raise SandboxError(f"the sandbox could not be set up: {report['setup_error']}")
        result = Result("failed", stdout.text(), stderr.text(), exit_code=report.get("exit"),
                        signal=report.get("signal"), seconds=seconds, cpu_seconds=report.get("cpu_seconds"),
                        truncated=bool(stdout.dropped or stderr.dropped))
        result.verdict, result.detail = _verdict(result, report, timed_out, limits, oom)
        return result, report

    @staticmethod
    def _collect(proc: subprocess.Popen, job: bytes, report_r: int, limits: Limits,
                 started: float) -> tuple[list[_Stream], bool]:
        """Feed the job, read stdout / stderr (capped) and the report until all close or the
        wall clock runs out (then kill, and drain for at most 5 s more)."""
        streams = {proc.stdout.fileno(): _Stream(limits.output_bytes), proc.stderr.fileno(): _Stream(limits.output_bytes),
                   report_r: _Stream(1 << 16)}
        timed_out = False
        try:
            proc.stdin.write(job)
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
        return list(streams.values()), timed_out


class _Cgroup:
    """A memory + pids cgroup for one run (as root; cgroup v2, or the v1 memory and pids
    controllers), so that the limits hold for all the sandbox's processes together: rlimits are
    per process, and 32 processes of 1 GB each would otherwise be 32 GB."""

    def __init__(self, directories: list[Path], procs_files: list[str], version: int) -> None:
        self.directories, self.procs_files, self.version = directories, procs_files, version

    @classmethod
    def create(cls, limits: Limits) -> "_Cgroup | None":
        name = f"qwen2-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        root = Path("/sys/fs/cgroup")
        memory = str(limits.memory_mb << 20)
        made: list[Path] = []
        try:
            if (root / "cgroup.controllers").is_file():  # v2
                if not {"memory", "pids"} <= set((root / "cgroup.subtree_control").read_text().split()):
                    return None
                group = root / name
                group.mkdir()
                made.append(group)
                (group / "memory.max").write_text(memory)
                if (group / "memory.swap.max").exists():
                    (group / "memory.swap.max").write_text("0")
                (group / "pids.max").write_text(str(limits.processes))
                return cls(made, [str(group / "cgroup.procs")], 2)
            if (root / "memory").is_dir() and (root / "pids").is_dir():  # v1
                for controller in ("memory", "pids"):
                    group = root / controller / name
                    group.mkdir()
                    made.append(group)
                (made[0] / "memory.limit_in_bytes").write_text(memory)
                (made[1] / "pids.max").write_text(str(limits.processes))
                return cls(made, [str(g / "cgroup.procs") for g in made], 1)
        except OSError:
            for group in reversed(made):
                try:
                    group.rmdir()
                except OSError:
                    pass
        return None

    def oom_killed(self) -> bool:
        try:
            events = (self.directories[0] / ("memory.events" if self.version == 2 else "memory.oom_control")).read_text()
        except OSError:
            return False
        return any(line.split()[0] == "oom_kill" and int(line.split()[1]) > 0 for line in events.splitlines()
                   if len(line.split()) == 2)

    def remove(self) -> None:
        for group in self.directories:
            for _ in range(200):  # the kernel frees the group once its last (killed) process is reaped
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return f"signal {number}"


def _verdict(result: Result, report: dict, timed_out: bool, limits: Limits, oom: bool = False) -> tuple[str, str]:
    if oom and not (result.exit_code == 0 and report.get("completed")):
        return "memory", f"its processes together ran out of {limits.memory_mb} MB (out-of-memory kill)"
    if timed_out:
        return "timeout", f"still running after {limits.wall_seconds:g} s (wall clock); killed"
    if not report:
        return "killed", "the sandbox ended without a report (killed from outside?)"
    sig = result.signal
    if sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and (report.get("cpu_seconds") or 0) >= limits.cpu_seconds):
        return "timeout", f"used its {limits.cpu_seconds} s of CPU time"
    if sig in CRASH_SIGNALS:
        return "crashed", f"died of {_signal_name(sig)}"
    if sig is not None:
        return "killed", f"killed by {_signal_name(sig)}"
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
