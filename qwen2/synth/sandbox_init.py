"""The sandbox's first process: PID 1 of fresh PID, mount, network, IPC and UTS namespaces.

Run by `sandbox.py` as `unshare ... python -I -S sandbox_init.py`, so it imports only the standard
library and nothing from qwen2 (an isolated interpreter, the package may not be importable). It
reads one JSON job from stdin, builds the file system view (a size-limited tmpfs on /tmp as the
working directory; hidden directories that lie on the way to the interpreter masked by a tmpfs),
then forks the child that drops everything it can (resource limits, no-new-privileges, a spare
uid or no capabilities, Landlock) and execs the interpreter on the program. PID 1 reaps orphans,
reports the child's end as one JSON line on the descriptor the job names, and exits: the kernel then kills whatever is
left in the namespace (daemons, fork bombs).
"""

import ctypes
import fcntl
import json
import os
import resource
import signal
import stat
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_SECUREBITS, PR_CAPBSET_DROP, PR_CAP_AMBIENT = 38, 28, 24, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# capabilities(7): NOROOT, NO_SETUID_FIXUP, KEEP_CAPS off, NO_CAP_AMBIENT_RAISE, each locked
SECBITS_LOCKED_NOROOT = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)

# Landlock file-system rights (linux/landlock.h) and the ABI that introduced them
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_RIGHTS_ABI1 = (1 << 13) - 1
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2


IGNORED_IN_INIT = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE)


def check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None), f"mount {target}")


def world_traversable(path: str) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def expose(paths: list[str]) -> None:
    """Let an unprivileged uid reach `paths` through ancestors it may not enter (/root is 0700 and
    holds pyenv's interpreters): mount a tmpfs over the first such ancestor, recreate the way down
    and bind the needed directories back in. Everything else under that ancestor disappears."""
    masks: dict[str, list[str]] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            if not world_traversable(ancestor):
                masks.setdefault(ancestor, []).append(path)
                break
    for ancestor, inside in sorted(masks.items()):
        handles = [(p, os.open(p, os.O_PATH)) for p in inside]  # reachable after the mask through the fd
        mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for path, fd in handles:
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)


def landlock(readable: list[str], writable: list[str]) -> int:
    """Restrict this process and its descendants to reading `readable`, writing `writable`, no
    TCP bind/connect, no signals or abstract sockets outside the sandbox. Returns the ABI (0 = absent)."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)
    if abi < 1:
        return 0
    fs = FS_RIGHTS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    attr = struct.pack("QQQ", fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                       SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    buf = ctypes.create_string_buffer(attr[:size], size)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, buf, size, 0)
    check(ruleset, "landlock_create_ruleset")
    read_rights = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    for rights, paths in ((read_rights, readable), (fs, writable)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a library directory this system does not have
            allowed = rights if stat.S_ISDIR(os.fstat(fd).st_mode) else rights & FILE_RIGHTS & fs
            rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12)
            check(libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
            os.close(fd)
    check(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return abi


def drop_capabilities() -> None:
    """Root inside a user namespace (no spare uid to become): keep uid 0 but hold no capability,
    now or after exec, so the program cannot unmount the masks or leave the namespaces."""
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability: fine
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    check(libc.prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT, 0, 0, 0), "prctl(SECUREBITS)")
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8)
    data = ctypes.create_string_buffer(bytes(24), 24)
    check(libc.syscall(SYS_CAPSET, header, data), "capset")


def run_child(job: dict, token_r: int, verdict_w: int) -> None:
    """In the forked child: limits, identity, Landlock, then exec. Never returns."""
    try:
        for number in IGNORED_IN_INIT:  # ignored dispositions survive exec: give the program the defaults
            signal.signal(number, signal.SIG_DFL)
        os.setsid()
        # the only descriptors the program gets: 0-2, the token (3), the verdict (4); moved out of
        # the way first, since either may already sit on 3 or 4
        token_r, verdict_w = fcntl.fcntl(token_r, fcntl.F_DUPFD, 100), fcntl.fcntl(verdict_w, fcntl.F_DUPFD, 100)
        os.dup2(token_r, 3)
        os.dup2(verdict_w, 4)
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        os.closerange(5, 65536)
        limits = job["limits"]
        for name, value in (("RLIMIT_CPU", limits["cpu_seconds"]), ("RLIMIT_AS", limits["memory_bytes"]),
                            ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                            ("RLIMIT_CORE", 0), ("RLIMIT_MEMLOCK", 0)):
            hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL a second later
            resource.setrlimit(getattr(resource, name), (value, hard))
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        if job["landlock"]:
            landlock(job["readable"], ["/tmp", "/dev/null"])
        if job["uid"] is not None:
            os.setgroups([])
            os.setgid(job["uid"])
            os.setuid(job["uid"])  # a uid nothing else runs as: RLIMIT_NPROC counts only ours
        else:
            drop_capabilities()
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
        os.chdir("/tmp")
        os.execve(job["argv"][0], job["argv"], job["env"])
    except BaseException as e:  # report and die; never fall back into PID 1's code
        os.write(2, f"sandbox: could not start the program: {e}\n".encode())
        os._exit(126)


def main() -> None:
    # PID 1 of the namespace: signals from the program (same uid without root) must not stop it
    for number in IGNORED_IN_INIT:
        signal.signal(number, signal.SIG_IGN)
    job = json.loads(sys.stdin.read())
    report_fd = job["report_fd"]
    try:
        report = supervise(job)
    except BaseException as e:  # noqa: BLE001 -- whatever stops the set-up is reported, never lost
        report = {"setup_error": f"{type(e).__name__}: {e}"}
    os.write(report_fd, (json.dumps(report) + "\n").encode())


def supervise(job: dict) -> dict:
    for procs in job["cgroup_procs"]:  # "0": this process; the child and all it starts follow
        with open(procs, "w") as f:
            f.write("0")
    mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    uid = job["uid"]
    options = f"size={job['limits']['tmp_bytes']},mode=1777,nr_inodes=4096"
    # an interpreter (a venv, a checkout) under /tmp must stay reachable once /tmp is replaced:
    # hold it by descriptor, then bind it back read-only at the same path inside the new /tmp
    under_tmp = sorted(p for p in job["readable_dirs"] if p.startswith("/tmp/"))
    under_tmp = [p for p in under_tmp if not any(p.startswith(q + "/") for q in under_tmp)]
    held = [(p, os.open(p, os.O_PATH)) for p in under_tmp]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options)  # the working directory; host /tmp hidden
    for path, fd in held:
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        mount("none", path, None, MS_BIND | MS_REMOUNT | MS_RDONLY)  # Landlock lets /tmp be written
        os.close(fd)
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
    for name, text in job["files"].items():
        path = os.path.join("/tmp", name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if uid is not None:
            os.chown(path, uid, uid)
    if uid is not None:
        expose(job["readable_dirs"])
    token_r, token_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    os.write(token_w, job["token"].encode())
    os.close(token_w)
    pid = os.fork()
    if pid == 0:
        os.close(verdict_r)
        run_child(job, token_r, verdict_w)
    os.close(token_r)
    os.close(verdict_w)
    os.set_blocking(verdict_r, False)  # orphans may hold the write end open
    status = None
    while status is None:  # PID 1 reaps every orphan until our child ends
        try:
            done, code = os.wait()
        except ChildProcessError:
            break
        if done == pid:
            status = code
    try:
        verdict = os.read(verdict_r, 256).decode(errors="replace")
    except BlockingIOError:
        verdict = ""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    abi = max(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1), 0) if job["landlock"] else 0
    report = {"cpu_seconds": usage.ru_utime + usage.ru_stime, "max_rss_kb": usage.ru_maxrss, "landlock_abi": abi,
              "cgroup": bool(job["cgroup_procs"]),
              "completed": bool(job["token"]) and verdict == job["token"]}
    if status is not None and os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    elif status is not None:
        report["exit"] = os.WEXITSTATUS(status)
    return report


if __name__ == "__main__":
    main()
