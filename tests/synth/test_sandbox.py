"""The sandbox contains each attack of RELIABILITY.md and reports it; the host is unaffected.

Every attack runs through a driver inside an outer PID namespace (`unshare --pid`), so that if
the sandbox were broken, `kill(-1, 9)` as root would end only the driver, not the test machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qwen2.synth.sandbox import Limits, Result, Sandbox

FAST = Limits(wall_seconds=4, cpu_seconds=2, memory_mb=512, tmp_mb=16, file_mb=4, output_bytes=64 << 10)

DRIVER = """
import json, sys
from qwen2.synth.sandbox import Limits, Sandbox
job = json.loads(sys.argv[1])
result = Sandbox(Limits(**job["limits"])).run(job["program"], files=job.get("files"))
peak_kb = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss
print(json.dumps({**result.__dict__, "driver_peak_kb": peak_kb}))
"""


def contained(program: str, limits: Limits = FAST, files: dict[str, str] | None = None) -> tuple[Result, dict]:
    """Run `program` in the sandbox, from a driver in its own PID namespace."""
    job = json.dumps({"program": textwrap.dedent(program), "files": files, "limits": limits.__dict__})
    command = [shutil.which("unshare") or "/usr/bin/unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
               sys.executable, "-c", DRIVER, job]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QWEN2_SANDBOX_TEST_SECRET": "hunter2-env-token"})
    assert done.returncode == 0, done.stderr[-2000:]
    raw = json.loads(done.stdout.splitlines()[-1])
    driver = {"driver_peak_kb": raw.pop("driver_peak_kb")}
    return Result(**raw), driver


def spare_uid_processes() -> list[int]:
    """Processes running under the sandbox's spare uids (200000 and up): none may outlive a run."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid >= 200_000:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_program_runs_and_its_files_and_output_come_back():
    result, _ = contained("""
        import os, sys
        print(open("data.txt").read().upper(), os.getcwd(), sys.stdin.read() == "")
        print("to stderr", file=sys.stderr)
    """, files={"data.txt": "héllo"})
    assert result.verdict == "passed", result
    assert result.stdout == "HÉLLO /tmp True\n" and result.stderr == "to stderr\n" and not result.truncated


def test_the_layers_are_probed_and_reported():
    layers = Sandbox(FAST).layers
    text = "\n".join(layers)
    assert "namespaces: pid, mount, network" in text and "rlimits" in text
    if os.geteuid() == 0:
        assert "spare uid" in text


def test_an_exception_is_a_failure_with_its_message():
    result, _ = contained("raise ValueError('wrong answer')")
    assert result.verdict == "failed" and result.exit_code == 1 and "ValueError: wrong answer" in result.detail


@pytest.mark.parametrize("program", ["while True: pass", "import time\ntime.sleep(60)",
                                     "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                     "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"])
def test_loops_and_sleeps_time_out(program):
    result, _ = contained(program)
    assert result.verdict == "timeout", result
    assert result.seconds <= FAST.wall_seconds + 2


def test_a_fork_bomb_is_contained_and_leaves_nothing_behind():
    before = len(spare_uid_processes())
    result, _ = contained("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert result.verdict == "timeout", result
    time.sleep(1)
    assert len(spare_uid_processes()) == before == 0


def test_a_daemon_does_not_outlive_the_run():
    result, _ = contained("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        print("parent done")
    """)
    assert result.verdict == "passed" and result.stdout == "parent done\n"
    time.sleep(1)
    assert spare_uid_processes() == []


def test_a_memory_bomb_is_reported_as_memory():
    for program in ("x = bytearray(10**11)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"):
        result, _ = contained(program)
        assert result.verdict == "memory", result


def test_filling_the_disk_stops_inside_the_sandbox():
    free = shutil.disk_usage("/").free
    for program, error in (("f = open('big', 'wb')\nwhile True:\n    f.write(bytes(1 << 20))", "File too large"),
                           ("for i in range(10**4):\n    open(f'f{i}', 'wb').write(bytes(1 << 20))",
                            "No space left on device"),
                           ("open('/dev/shm/x', 'wb').write(bytes(8 << 20))", "")):
        result, _ = contained(program)
        assert result.verdict == "failed" and error in result.stderr, result
    assert abs(shutil.disk_usage("/").free - free) < 64 << 20


def test_secrets_outside_the_working_directory_stay_unread(tmp_path):
    here = Path(__file__).parent
    world = here / f".secret-{os.getpid()}.txt"  # world-readable, outside /tmp
    private = tmp_path / "secret.txt"
    world.write_text("world-readable-token-1")
    private.write_text("private-token-2")
    private.chmod(0o600)
    try:
        result, _ = contained(f"""
            import os, glob
            for path in [{str(world)!r}, {str(private)!r}, "/root/.bash_history", "/etc/shadow"]:
                try:
                    print(open(path).read())
                except OSError as e:
                    print(type(e).__name__)
            print(dict(os.environ))
            for path in glob.glob("/proc/*/environ"):
                try:
                    print(open(path, "rb").read())
                except OSError as e:
                    print(type(e).__name__)
        """)
    finally:
        world.unlink()
    assert result.verdict == "passed", result
    for token in ("world-readable-token-1", "private-token-2", "hunter2-env-token", "QWEN2_SANDBOX_TEST_SECRET"):
        assert token not in result.stdout + result.stderr
    assert "{'PATH': '/usr/bin:/bin', 'HOME': '/tmp', 'TMPDIR': '/tmp', 'LANG': 'C.UTF-8'}" in result.stdout


def test_writing_outside_the_working_directory_changes_nothing():
    here = Path(__file__).parent
    canary = here / f".canary-{os.getpid()}.txt"
    canary.write_text("unchanged")
    canary.chmod(0o666)
    digest = hashlib.sha256(canary.read_bytes()).hexdigest()
    try:
        result, _ = contained(f"""
            import os
            for action in (lambda: open({str(canary)!r}, "w").write("owned"),
                           lambda: os.remove({str(canary)!r}),
                           lambda: open({str(here / "new-file.py")!r}, "w").write("x"),
                           lambda: os.symlink("/etc/passwd", "link") or open("link").read()):
                try:
                    action()
                    print("done")
                except OSError as e:
                    print(type(e).__name__)
        """)
        assert result.verdict == "passed" and "done" not in result.stdout, result
        assert hashlib.sha256(canary.read_bytes()).hexdigest() == digest
        assert not (here / "new-file.py").exists()
    finally:
        canary.unlink()


def test_no_network_not_even_loopback():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    result, _ = contained(f"""
        import socket
        for attempt in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2),
                        lambda: socket.create_connection(("1.1.1.1", 80), timeout=2),
                        lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53)),
                        lambda: socket.getaddrinfo("pypi.org", 443)):
            try:
                attempt()
                print("connected")
            except OSError as e:
                print(type(e).__name__)
    """)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    assert result.verdict == "passed" and "connected" not in result.stdout, result


def test_killing_everything_kills_nothing_outside():
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result, _ = contained(f"""
            import os, signal
            for pid in (-1, {os.getpid()}, {sentinel.pid}, 1):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as e:
                    print(type(e).__name__)
            print("survived")
        """)
        assert sentinel.poll() is None  # still running
        assert result.stdout.endswith("survived\n"), result
    finally:
        sentinel.kill()
        sentinel.wait()


def test_huge_output_is_capped_and_flagged():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, driver = contained("""
        import sys
        block = "x" * (1 << 20)
        for _ in range(1024):  # 1 GB
            sys.stdout.write(block)
        print("done", file=sys.stderr)
    """, limits=Limits(**{**FAST.__dict__, "wall_seconds": 30}))
    assert result.verdict == "passed" and result.truncated, result
    assert len(result.stdout) == FAST.output_bytes and result.stderr == "done\n"
    assert driver["driver_peak_kb"] < 100_000  # the parent holds the cap, not the gigabyte
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000


def test_a_segfault_is_a_crash():
    result, _ = contained("import ctypes\nctypes.string_at(0)")
    assert result.verdict == "crashed" and "SIGSEGV" in result.detail


@pytest.mark.parametrize("program", ["import sys\nprint('PASSED')\nsys.exit(0)", "import os\nos._exit(0)",
                                     "raise SystemExit(0)", "import os\nos.write(4, b'0' * 32)\nos._exit(0)",
                                     "import os\nos.kill(os.getpid(), 9)"])
def test_verdict_forgery_is_not_a_pass(program):
    result, _ = contained(program + "\nraise AssertionError('the tests failed')")
    assert result.verdict != "passed", result


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="cpu_seconds"):
        Limits(cpu_seconds=0)
    with pytest.raises(ValueError, match="plain names"):
        Sandbox(FAST).run("pass", files={"../x": ""})


UNPRIVILEGED_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from qwen2.synth.sandbox import Limits, Sandbox
box = Sandbox(Limits(wall_seconds=4, cpu_seconds=2, memory_mb=512))
programs = {
    "identity": "import os\\nstatus = open('/proc/self/status').read()\\n"
                "print(os.getuid(), status.split('CapEff:')[1].split()[0])",
    "unmount": "import ctypes\\nprint(ctypes.CDLL(None, use_errno=True).umount2(b'/tmp', 2), ctypes.get_errno())",
    "secret": "print(open(sys_argv_secret).read())",
    "network": "import socket\\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
    "fork_bomb": "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass",
}
results = {"layers": box.layers}
for name, program in programs.items():
    program = program.replace("sys_argv_secret", repr(sys.argv[2]))
    r = box.run(program)
    results[name] = [r.verdict, r.stdout, r.stderr[-300:]]
print(json.dumps(results))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not shutil.which("setpriv"),
                    reason="needs root to become an unprivileged user, a system python3 and setpriv")
def test_the_unprivileged_path_contains_attacks_too(tmp_path):
    """As a normal user (here: nobody) the sandbox uses a user namespace and keeps uid 0 inside it
    with no capabilities: the same attacks fail."""
    repo = Path(__file__).resolve().parents[2]
    if not all(os.stat(d).st_mode & 0o001 for d in [repo, *repo.parents]) or not os.stat(repo / "qwen2").st_mode & 0o005:
        pytest.skip(f"{repo} is not readable by other users, so `nobody` cannot import qwen2 from it")
    secret = Path(__file__).parent / f".secret-unprivileged-{os.getpid()}.txt"
    secret.write_text("unprivileged-secret-token")
    secret.chmod(0o644)
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "setpriv",
                               "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                               UNPRIVILEGED_DRIVER, str(repo), str(secret)],
                              capture_output=True, text=True, timeout=120, cwd="/")
    finally:
        secret.unlink()
    if done.returncode != 0 and "user namespace" in done.stderr.lower():
        pytest.skip(f"unprivileged user namespaces are disabled here: {done.stderr[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert "namespaces: pid, mount, network, ipc, uts, user" in results["layers"]
    assert results["identity"][0] == "passed" and results["identity"][1].split() == ["0", "0000000000000000"]
    assert results["unmount"][1].split()[0] == "-1"  # no CAP_SYS_ADMIN: the masks cannot be lifted
    assert results["secret"][0] == "failed" and "unprivileged-secret-token" not in "".join(results["secret"])
    assert results["network"][0] == "failed"
    assert results["fork_bomb"][0] == "timeout"


def test_memory_spread_over_processes_is_limited_in_total():
    if not any("cgroup: memory" in layer for layer in Sandbox(FAST).layers):
        pytest.skip("no cgroup here (not root, or no memory / pids controllers): memory is limited per process only")
    result, _ = contained("""
        import os, time
        for _ in range(3):
            os.fork()  # 8 processes, each well under the per-process limit
        block = bytearray(200 << 20)
        time.sleep(1)
    """)
    assert result.verdict == "memory", result
    leftovers = [p for c in ("memory", "pids", "") for p in Path("/sys/fs/cgroup", c).glob("qwen2-sandbox-*")]
    assert leftovers == []


def test_any_signal_is_a_verdict_not_an_exception():
    result, _ = contained("import os\nos.kill(os.getpid(), 40)")  # a real-time signal has no name
    assert result.verdict == "killed" and "signal 40" in result.detail


def test_an_interpreter_under_tmp_stays_reachable_and_read_only(tmp_path):
    """A venv (or a checkout) under /tmp must survive the sandbox's own tmpfs on /tmp."""
    import venv

    env = tmp_path / "venv"
    venv.create(env, with_pip=False, symlinks=True)
    repo = Path(__file__).resolve().parents[2]
    driver = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom qwen2.synth.sandbox import Limits, Sandbox\n"
              "box = Sandbox(Limits(wall_seconds=5, cpu_seconds=3))\n"
              "ok = box.run('print(6 * 7)')\n"
              "write = box.run(f'open({sys.argv[2]!r} + \"/planted\", \"w\")')\n"
              "print(json.dumps([ok.verdict, ok.stdout, write.verdict, write.stderr[-200:]]))\n")
    done = subprocess.run([shutil.which("unshare") or "/usr/bin/unshare", "--pid", "--fork", "--mount-proc",
                           "--kill-child", str(env / "bin" / "python"), "-c", driver, str(repo), str(env)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ok, out, write, err = json.loads(done.stdout.splitlines()[-1])
    assert (ok, out) == ("passed", "42\n")
    assert write == "failed" and ("Read-only" in err or "Permission denied" in err), err
    assert not (env / "planted").exists()
