"""Side-by-side benchmark of overlayd, fuse-overlayfs, the kernel overlay and the plain directory.

Run through `scripts/bench` (as root, with the repository's .venv python). It

1. builds a container-like lower tree and the other inputs deterministically (seeded), once per
   scale, in the work directory (default /var/tmp/overlayd-bench), so that reruns reuse them;
2. runs every workload on every target, interleaved (A B C D, then B C D A, ...), each
   repetition on a fresh upper layer and a fresh mount, with the page cache dropped for the cold
   variants and before the workloads that create many files (Workload.creates); the timed
   commands are the same shell commands on every target, timed with time.perf_counter around
   the subprocess;
3. prints the medians, the ratios overlayd / fuse-overlayfs and overlayd / kernel, and the
   machine's noise (a second fuse-overlayfs target against the first), writes JSON and, when
   matplotlib is importable, a PNG bar chart of the ratios, both outside the repository.

Usage (as root; --help lists every option):

    scripts/bench --quick                      # scale 0.1, 3 repetitions: about 2 minutes
    scripts/bench                              # scale 1, 5 repetitions: about 30 minutes
    scripts/bench --only walk,lsl --targets overlayd,fuse-overlayfs --reps 3
    .venv/bin/pip install -e '.[bench]'        # matplotlib, for the chart (or --install-deps)

Targets: overlayd (`overlayd mount -f`), fuse-overlayfs (`fuse-overlayfs -f`), the kernel overlay
(`mount -t overlay` with redirect_dir=off,index=off,metacopy=off,xino=off) and plain (the lower
directory itself for the read workloads, a scratch directory, with a copy of what the workload
changes, for the others), plus fuse-overlayfs-2 for the noise column (--no-noise drops it). The
daemons run in the foreground so that their pid, for VmHWM/VmRSS, is the process started here
(overlayd's state file in /run/overlayd is preferred when it names the mount). The "lookups" and
"layers" workloads (RSS after 100,000 lookups and after the kernel forgets them; mount-ready time
and lookup cost with 100 lower layers against 1) run on the FUSE targets only. Without root, the
kernel target, the cold variants and the forget measurement are skipped.

Every mount it makes is unmounted in a finally block (fusermount3 -u, then -uz, then the daemon it
started itself is terminated and killed; umount, then umount -l for the kernel's). It never
signals a process it did not start. Single-threaded; a lock file keeps two runs from sharing
one work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import io
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlayd import cli

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DEFAULT_WORKDIR = Path("/var/tmp/overlayd-bench")
FUSERMOUNT = "fusermount3"
FUSE_OVERLAYFS = "fuse-overlayfs"
# The kernel's options pinned as in the tests (tests/mounting.py), so the reference does not
# drift with the module's defaults.
KERNEL_PINNED = "redirect_dir=off,index=off,metacopy=off,xino=off"
READY_TIMEOUT = 60.0
COMMAND_TIMEOUT = 3600.0
# Bump when the generated data changes, so that cached data of an older layout is rebuilt.
DATA_VERSION = 1
SEED = "overlayd-bench-1"
MTIME = 1_700_000_000  # every generated file and directory gets this mtime
MIB = 1024 * 1024
NEEDLE = "OVERLAYD_BENCH_NEEDLE"  # the generated text is lowercase: only planted copies match

OVERLAYD = "overlayd"
FOVL = "fuse-overlayfs"
FOVL2 = "fuse-overlayfs-2"  # the noise target: fuse-overlayfs again, as a target of its own
KERNEL = "kernel"
PLAIN = "plain"
TARGETS = (OVERLAYD, FOVL, KERNEL, PLAIN)
FUSE_TARGETS = (OVERLAYD, FOVL, FOVL2)

# Commands run by bash with ROOT (the merged view, or the plain directory), DATA (the generated
# inputs) and N (a count) in the environment; LC_ALL=C everywhere. Output that a tool could
# special-case when it is /dev/null (GNU tar and grep do) goes through a pipe to cat.
CMD_WALK = "find \"$ROOT\" -printf '%s %m %u\\n' > /dev/null"
CMD_READALL = 'find "$ROOT/rootfs" -type f -exec cat {} + | cat > /dev/null'
CMD_COPYUP = ('cd "$ROOT" && while IFS= read -r f; do printf x >> "$f"; done '
              '< "$DATA/copyup.list"')
CMD_CREATE = 'mkdir "$ROOT/new" && cd "$ROOT/new" && for i in $(seq "$N"); do echo x > "f$i"; done'
CMD_DELETE = 'rm -rf "$ROOT/new"'
CMD_UNTAR = 'mkdir "$ROOT/untar" && tar -xf "$DATA/untar.tar" -C "$ROOT/untar"'
CMD_GREP = f'grep -r {NEEDLE} "$ROOT/untar" | cat > /dev/null'
CMD_LSL = 'ls -l "$ROOT/bench/dir20k" | cat > /dev/null'
CMD_WRITE = 'dd if=/dev/zero of="$ROOT/write.out" bs=1M count="$N" conv=fsync status=none'
CMD_READBIG = 'dd if="$ROOT/bench/big.bin" of=/dev/null bs=1M status=none'
CMD_RM = 'rm -rf "$ROOT/rootfs/usr/share/doc"'
CMD_LOOKUPS = "find \"$ROOT\" -printf '%s\\n' | cat > /dev/null"
# One FUSE request per call, nothing else: what a request costs each target, end to end.
CMD_REQ_GETXATTR = ('python3 -c \'import os, sys\nfor _ in range(int(sys.argv[2])):\n'
                    '    try: os.getxattr(sys.argv[1], "user.missing")\n'
                    '    except OSError: pass\' "$ROOT/bench/big.bin" "$N"')
CMD_REQ_OPEN = ('python3 -c \'import os, sys\nfor _ in range(int(sys.argv[2])):\n'
                '    os.close(os.open(sys.argv[1], os.O_RDONLY))\' "$ROOT/bench/big.bin" "$N"')
CMD_DEEP_STAT = 'cd "$ROOT/deep" && xargs stat -c %s < "$DATA/deep.list" | cat > /dev/null'


class BenchError(Exception):
    """A failure that ends the run with a one-line message (and exit status 1)."""


def say(*parts: object) -> None:
    print(*parts, flush=True)


# --- sizes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """Every count and size of the generated data and the workloads, at one scale."""

    scale: float

    def n(self, full: int, minimum: int = 1) -> int:
        return max(minimum, round(full * self.scale))

    @property
    def tag(self) -> str:
        return f"s{self.scale:g}"

    # The rootfs: (directory, number of files, mode); 32k files and ~300 MB at scale 1.
    @property
    def rootfs_groups(self) -> list[tuple[str, int, int]]:
        return [
            ("usr/lib", self.n(12_000, 20), 0o644),
            ("usr/include", self.n(4_000, 10), 0o644),
            ("usr/bin", self.n(1_000, 5), 0o755),
            ("usr/share/misc", self.n(6_000, 10), 0o644),
            ("usr/share/doc", self.n(4_000, 10), 0o644),  # the rm -rf target
            ("etc", self.n(1_500, 5), 0o644),
            ("var/lib", self.n(3_500, 10), 0o640),
        ]

    @property
    def dir_entries(self) -> int:
        return self.n(20_000, 100)

    @property
    def big_file_mib(self) -> int:
        return self.n(512, 4)

    @property
    def tar_files(self) -> int:
        return self.n(14_000, 50)

    @property
    def copyup_files(self) -> int:
        return self.n(2_000, 10)

    @property
    def create_files(self) -> int:
        return self.n(5_000, 10)

    @property
    def write_mib(self) -> int:
        return self.n(1024, 8)

    @property
    def lookup_files(self) -> int:
        return self.n(100_000, 1000)

    @property
    def layers(self) -> int:
        return 100  # the layer count is the point: it is not scaled

    @property
    def deep_files(self) -> int:
        return self.n(5_000, 100)

    def describe(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "rootfs_files": sum(n for _, n, _ in self.rootfs_groups),
            "dir_entries": self.dir_entries,
            "big_file_mib": self.big_file_mib,
            "tar_files": self.tar_files,
            "copyup_files": self.copyup_files,
            "create_files": self.create_files,
            "write_mib": self.write_mib,
            "lookup_files": self.lookup_files,
            "layers": self.layers,
            "deep_files": self.deep_files,
        }


# --- deterministic data ------------------------------------------------------------------------

def text_pool(rng: random.Random, size: int) -> bytes:
    """Pseudo-random lowercase text with spaces and newlines (greppable, not compressible)."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789" + b" " * 10 + b"\n" * 2 + b"_.-="
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    return rng.randbytes(size).translate(table)


POOL_SIZE = 8 * MIB


def file_size(rng: random.Random, low: int, high: int, big_every: int) -> int:
    """Log-uniform in [low, high], and now and then (1 in *big_every*) 1-4 MiB, as libraries."""
    if rng.randrange(big_every) == 0:
        return rng.randrange(MIB, 4 * MIB)
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def content(pool: bytes, rng: random.Random, size: int) -> bytes:
    start = rng.randrange(POOL_SIZE - size) if size < POOL_SIZE else 0
    return pool[start:start + size]


def write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.chmod(path, mode)


def build_rootfs(lower: Path, sizes: Sizes, pool: bytes) -> list[str]:
    """The container-like tree under lower/rootfs; returns its regular files, relative to lower."""
    files: list[str] = []
    for group, count, mode in sizes.rootfs_groups:
        rng = random.Random(f"{SEED}:{group}")
        per_dir = 24
        for i in range(count):
            pkg, slot = divmod(i, per_dir)
            sub = f"pkg{pkg:04d}" + ("/data" if slot >= per_dir // 2 else "")
            d = lower / "rootfs" / group / sub
            d.mkdir(parents=True, exist_ok=True)
            name = f"f{i:05d}{rng.choice(['.so', '.h', '.txt', '.py', '.conf', ''])}"
            if i % 50 == 7 and slot > 0:  # about 2% symlinks, to a sibling
                os.symlink(f"f{i - 1:05d}", d / (name + ".lnk"))
            size = file_size(rng, 32, 64 * 1024, 1000)
            write_file(d / name, content(pool, rng, size), mode)
            files.append(str((d / name).relative_to(lower)))
    return files


def build_lower(lower: Path, data: Path, sizes: Sizes) -> None:
    pool = text_pool(random.Random(f"{SEED}:pool"), POOL_SIZE)
    files = build_rootfs(lower, sizes, pool)
    # copy-up targets: every k-th regular file outside the rm -rf target, in a fixed order
    candidates = [f for f in files if not f.startswith("rootfs/usr/share/doc/")]
    step = max(1, len(candidates) // sizes.copyup_files)
    chosen = candidates[::step][:sizes.copyup_files]
    (data / "copyup.list").write_text("".join(f + "\n" for f in chosen))
    # a big directory for ls -l
    d = lower / "bench" / "dir20k"
    d.mkdir(parents=True)
    rng = random.Random(f"{SEED}:dir20k")
    for i in range(sizes.dir_entries):
        write_file(d / f"entry-{i:05d}", content(pool, rng, rng.randrange(0, 200)), 0o644)
    # one big file, 1 MiB blocks each stamped with its index
    block = random.Random(f"{SEED}:big").randbytes(MIB)
    with open(lower / "bench" / "big.bin", "wb") as f:
        for i in range(sizes.big_file_mib):
            f.write(i.to_bytes(8, "little") + block[8:])


def build_tarball(path: Path, sizes: Sizes) -> None:
    """A ~14k-file source-like tree as an uncompressed tar (about 190 MB at scale 1)."""
    rng = random.Random(f"{SEED}:tar")
    pool = text_pool(random.Random(f"{SEED}:tarpool"), POOL_SIZE)
    per_dir = 30
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        made: set[str] = set()
        for i in range(sizes.tar_files):
            d = f"src/mod{i // (per_dir * 10):03d}/pkg{i // per_dir:04d}"
            parts = d.split("/")
            for k in range(1, len(parts) + 1):
                sub = "/".join(parts[:k])
                if sub not in made:
                    made.add(sub)
                    info = tarfile.TarInfo(sub)
                    info.type = tarfile.DIRTYPE
                    info.mode, info.mtime = 0o755, MTIME
                    tar.addfile(info)
            body = content(pool, rng, file_size(rng, 64, 96 * 1024, 1000))
            if i % 97 == 0:
                body = NEEDLE.encode() + b"\n" + body
            info = tarfile.TarInfo(f"{d}/file{i:05d}.c")
            info.size, info.mode, info.mtime = len(body), 0o644, MTIME
            tar.addfile(info, io.BytesIO(body))


def build_lookup_tree(lower: Path, sizes: Sizes) -> None:
    """Many empty files, 1000 to a directory: the 100,000 lookups."""
    for i in range(sizes.lookup_files):
        d = lower / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        write_file(d / f"f{i % 1000:04d}", b"", 0o644)


def build_layers(base: Path, data: Path, sizes: Sizes) -> None:
    """layers100/L000..L099 (L000 topmost) and layers1/L000: in both, the names of deep.list
    are in the bottom layer's deep/, so that each lookup passes every layer above it."""
    names = [f"n{i:05d}" for i in range(sizes.deep_files)]
    (data / "deep.list").write_text("".join(n + "\n" for n in names))
    for count, top in ((sizes.layers, base / "layers100"), (1, base / "layers1")):
        for k in range(count):
            layer = top / f"L{k:03d}"
            (layer / "deep").mkdir(parents=True)
            (layer / "common").mkdir()
            write_file(layer / f"only{k:03d}", b"x\n", 0o644)
            for j in range(5):
                write_file(layer / "common" / f"c{k:03d}-{j}", b"x\n", 0o644)
            if k == count - 1:
                for n in names:
                    write_file(layer / "deep" / n, b"", 0o644)


def set_mtimes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))


@dataclass(frozen=True)
class Data:
    """The generated inputs of one scale."""

    root: Path

    @property
    def lower(self) -> Path:
        return self.root / "lower"

    @property
    def lookups(self) -> Path:
        return self.root / "lookups"

    def layer_dirs(self, count: int) -> list[Path]:
        top = self.root / ("layers100" if count > 1 else "layers1")
        return [top / f"L{k:03d}" for k in range(count)]


def ensure_data(workdir: Path, sizes: Sizes) -> Data:
    """The data of this scale, built unless a complete copy of this version is there."""
    root = workdir / f"data-{sizes.tag}"
    stamp = root / "complete.json"
    want = {"version": DATA_VERSION, "seed": SEED, **sizes.describe()}
    if stamp.exists():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(stamp.read_text()) == want:
                say(f"data: reusing {root}")
                return Data(root)
    building = workdir / f"data-{sizes.tag}.building"
    for old in (root, building):
        if old.exists():
            shutil.rmtree(old)
    say(f"data: building {root} (once per scale) ...")
    started = time.perf_counter()
    building.mkdir(parents=True)
    build_lower(building / "lower", building, sizes)
    build_tarball(building / "untar.tar", sizes)
    build_lookup_tree(building / "lookups", sizes)
    build_layers(building, building, sizes)
    for sub in ("lower", "lookups", "layers100", "layers1"):
        set_mtimes(building / sub)
    os.sync()
    building.rename(root)
    stamp.write_text(json.dumps(want, indent=1) + "\n")
    say(f"data: built in {time.perf_counter() - started:.1f} s")
    return Data(root)


# --- mounts ------------------------------------------------------------------------------------

def mount_fstype(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at *mountpoint*, or None (the top mount wins)."""
    return cli.mount_fstype(os.fsencode(os.path.realpath(mountpoint)))


def quiet(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def unmount(mountpoint: Path, proc: subprocess.Popen[bytes] | None) -> None:
    """Unmount what we mounted at *mountpoint*; then end *proc* (our own daemon), if given."""
    try:
        fstype = mount_fstype(mountpoint)
        if fstype is not None and fstype.startswith("fuse"):
            quiet([FUSERMOUNT, "-u", str(mountpoint)])
            if mount_fstype(mountpoint) is not None:
                quiet([FUSERMOUNT, "-uz", str(mountpoint)])
        elif fstype is not None:
            quiet(["umount", str(mountpoint)])
            if mount_fstype(mountpoint) is not None:
                quiet(["umount", "-l", str(mountpoint)])
    finally:
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def overlay_opts(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    return f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"


def vm_status(pid: int, key: str) -> int | None:
    """A field of /proc/PID/status in bytes (VmHWM, VmRSS), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def overlayd_state_pid(mountpoint: Path) -> int | None:
    """The daemon pid that overlayd's state file (`overlayd status`) records for *mountpoint*."""
    target = os.path.realpath(mountpoint)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/run/overlayd"):
            if entry.name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError):
                    info = json.loads(Path(entry.path).read_text())
                    if info.get("mountpoint") == target and isinstance(info.get("pid"), int):
                        return int(info["pid"])
    return None


@dataclass
class Mounted:
    """A target ready for a workload: ROOT for the commands and the daemon's pid, if any."""

    root: Path
    pid: int | None
    ready_seconds: float | None = None


class Target:
    """One column of the table: how to make a fresh writable view of some lower layers."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.base = base  # run/<name>: upper, work, mnt, scratch, daemon.log

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    @property
    def scratch(self) -> Path:
        return self.base / "scratch"

    @property
    def is_fuse(self) -> bool:
        return self.name in FUSE_TARGETS

    def fresh(self) -> tuple[Path, Path]:
        """An empty upper and workdir (and scratch), the old ones removed."""
        upper, work = self.base / "upper", self.base / "work"
        for d in (upper, work, self.scratch):
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        return upper, work

    def cleanup(self) -> None:
        unmount(self.mnt, None)  # a mount left by a killed earlier run of ours
        for d in ("upper", "work", "scratch"):
            if (self.base / d).exists():
                shutil.rmtree(self.base / d)

    @contextlib.contextmanager
    def mounted(self, lowers: Sequence[Path]) -> Iterator[Mounted]:
        upper, work = self.fresh()
        opts = overlay_opts(lowers, upper, work)
        if self.name == PLAIN:
            yield Mounted(self.scratch, None)
        elif self.name == KERNEL:
            started = time.perf_counter()
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"{opts},{KERNEL_PINNED}", str(self.mnt)],
                               check=False, capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"kernel overlay mount failed: {r.stderr.strip()}")
            try:
                yield Mounted(self.mnt, None, time.perf_counter() - started)
            finally:
                unmount(self.mnt, None)
        else:
            yield from self._fuse(opts)

    def _fuse(self, opts: str) -> Iterator[Mounted]:
        if self.name == OVERLAYD:
            argv = [str(VENV_BIN / "overlayd"), "mount", "-f", "-o", opts, str(self.mnt)]
        else:
            argv = [FUSE_OVERLAYFS, "-f", "-o", opts, str(self.mnt)]
        log_path = self.base / "daemon.log"
        started = time.perf_counter()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not (mount_fstype(self.mnt) or "").startswith("fuse"):
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise BenchError(f"{self.name} exited with {proc.returncode}:\n{tail}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} not mounted after {READY_TIMEOUT} s")
                time.sleep(0.002)
            os.stat(self.mnt)  # the first request answered
            ready = time.perf_counter() - started
            pid = proc.pid
            if self.name == OVERLAYD:
                pid = overlayd_state_pid(self.mnt) or pid
            yield Mounted(self.mnt, pid, ready)
        finally:
            unmount(self.mnt, proc)


# --- running commands --------------------------------------------------------------------------

def drop_caches(level: int = 3) -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write(f"{level}\n")


def run_cmd(cmd: str, root: Path, data: Data, n: int) -> float:
    """Run *cmd* under bash and return its wall time; a failure raises BenchError."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "HOME": os.environ.get("HOME", "/root"),
        "ROOT": str(root),
        "DATA": str(data.root),
        "N": str(n),
    }
    started = time.perf_counter()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], env=env, cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the command and its pipes
        proc.wait()
        raise
    elapsed = time.perf_counter() - started
    # grep exits 1 when nothing matched; the planted needle always matches, so 1 is a failure too
    if proc.returncode != 0:
        raise BenchError(f"`{cmd}` exited with {proc.returncode}: "
                         f"{err.decode(errors='replace').strip()[-1000:]}")
    return elapsed


# --- workloads ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of the table."""

    key: str
    label: str
    unit: str = "s"  # "s" or "MiB"
    goal: str = ""  # the goal for overlayd / fuse-overlayfs (or an absolute one)
    goal_ratio: float | None = None  # goal on the ratio to fuse-overlayfs, lower is better


@dataclass
class Context:
    data: Data
    sizes: Sizes
    root_user: bool
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    peak_rss: dict[str, list[float]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def record(self, row: str, target: str, value: float) -> None:
        self.results.setdefault(row, {}).setdefault(target, []).append(value)


PlainPrep = Callable[[Data, Path], Path]


def plain_lower(data: Data, scratch: Path) -> Path:
    return data.lower


def plain_scratch(data: Data, scratch: Path) -> Path:
    return scratch


def plain_copyup(data: Data, scratch: Path) -> Path:
    for rel in (data.root / "copyup.list").read_text().split():
        (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data.lower / rel, scratch / rel)
    return scratch


def plain_rm(data: Data, scratch: Path) -> Path:
    rel = "rootfs/usr/share/doc"
    shutil.copytree(data.lower / rel, scratch / rel, symlinks=True)
    return scratch


@dataclass(frozen=True)
class Step:
    row: str | None  # the row it is timed for; None: run untimed (warming up, preparing)
    cmd: str
    cold: bool = False  # drop the page cache (and dentries and inodes) first


@dataclass(frozen=True)
class Workload:
    name: str
    steps: tuple[Step, ...]
    plain: PlainPrep
    count: Callable[[Sizes], int] = lambda s: 0
    # Creates many files: the page cache is dropped first (root only), so that the inode-table
    # blocks of the files the bench deleted before are no longer cached. ext4 without a journal
    # (this VM's) skips recently deleted inodes when it allocates, checking each candidate in
    # the cached blocks: after the bench's own deletes that made 5,000 creates in the plain
    # directory take 1.9 s instead of 0.1 s, for every target alike, and hid the daemons.
    creates: bool = False

    @property
    def rows(self) -> list[str]:
        return [s.row for s in self.steps if s.row is not None]


ROWS = [
    Row("walk_cold", "tree walk, cold (find -printf)", goal="<= 1.5", goal_ratio=1.5),
    Row("walk_warm", "tree walk, warm", goal="<= 1.0", goal_ratio=1.0),
    Row("readall_cold", "read every file, cold", goal="<= 1.5", goal_ratio=1.5),
    Row("readall_warm", "read every file, warm", goal="<= 1.0", goal_ratio=1.0),
    Row("copyup", "copy-up (append 1 byte)", goal="<= 1.5", goal_ratio=1.5),
    Row("create", "create small files", goal="<= 0.7", goal_ratio=0.7),
    Row("delete", "delete them (rm -rf)", goal="<= 0.7", goal_ratio=0.7),
    Row("untar", "untar into the mount", goal="<= 0.7", goal_ratio=0.7),
    Row("grep", "grep -r the untarred tree"),
    Row("lsl", "ls -l of the big directory", goal="<= 0.7", goal_ratio=0.7),
    Row("write", "sequential write + fsync", goal="<= 1.0", goal_ratio=1.0),
    Row("readbig", "read the big lower file, cold", goal="<= 1.0", goal_ratio=1.0),
    Row("rm", "rm -rf of a lower subtree", goal="<= 0.7", goal_ratio=0.7),
    Row("req_getxattr", "getxattr of a missing xattr, N times (1 request each)"),
    Row("req_open", "open + close, N times (2 or 3 requests each)"),
    Row("peak_rss", "daemon peak RSS (VmHWM, max)", unit="MiB"),
    Row("rss_lookups", "RSS after the lookups", unit="MiB", goal="<= 150 MiB"),
    Row("rss_forget", "RSS after the kernel forgot", unit="MiB", goal="falls back"),
    Row("mount_ready_100", "mount ready, 100 layers", goal="< 1 s"),
    Row("mount_ready_1", "mount ready, 1 layer"),
    Row("lookup_100", "lookups, 100 layers", goal="<= 2x 1 layer"),
    Row("lookup_1", "lookups, 1 layer"),
]
ROW_BY_KEY = {r.key: r for r in ROWS}

WORKLOADS = [
    Workload("walk", (Step("walk_cold", CMD_WALK, cold=True),), plain_lower),
    Workload("walk", (Step(None, CMD_WALK), Step("walk_warm", CMD_WALK)), plain_lower),
    Workload("readall", (Step("readall_cold", CMD_READALL, cold=True),), plain_lower),
    Workload("readall", (Step(None, CMD_READALL), Step("readall_warm", CMD_READALL)),
             plain_lower),
    Workload("copyup", (Step("copyup", CMD_COPYUP),), plain_copyup),
    Workload("create", (Step("create", CMD_CREATE), Step("delete", CMD_DELETE)), plain_scratch,
             lambda s: s.create_files, creates=True),
    Workload("untar", (Step("untar", CMD_UNTAR), Step("grep", CMD_GREP)), plain_scratch,
             creates=True),
    Workload("lsl", (Step("lsl", CMD_LSL),), plain_lower),
    Workload("write", (Step("write", CMD_WRITE),), plain_scratch, lambda s: s.write_mib),
    Workload("readbig", (Step("readbig", CMD_READBIG, cold=True),), plain_lower),
    Workload("rm", (Step("rm", CMD_RM),), plain_rm),
    Workload("requests", (Step(None, CMD_REQ_GETXATTR), Step("req_getxattr", CMD_REQ_GETXATTR),
                          Step("req_open", CMD_REQ_OPEN)), plain_lower,
             lambda s: 4 * s.create_files),
]
EXTRAS = ("lookups", "layers")  # FUSE targets only
WORKLOAD_NAMES = tuple(dict.fromkeys([w.name for w in WORKLOADS] + list(EXTRAS)))
ALIASES = {"createdelete": "create", "delete": "create", "grep": "untar", "ls": "lsl",
           "rss": "lookups", "mount": "layers"}


def rotation(targets: Sequence[Target], rep: int) -> list[Target]:
    k = rep % len(targets)
    return [*targets[k:], *targets[:k]]


def run_workload(ctx: Context, w: Workload, target: Target) -> dict[str, float]:
    steps = [s for s in w.steps if ctx.root_user or not s.cold]
    out: dict[str, float] = {}
    with target.mounted([ctx.data.lower]) as m:
        root = w.plain(ctx.data, target.scratch) if target.name == PLAIN else m.root
        os.sync()  # no writeback of an earlier run's data inside this one
        if w.creates and ctx.root_user:
            drop_caches(1)
        for step in steps:
            if step.cold:
                drop_caches()
            t = run_cmd(step.cmd, root, ctx.data, w.count(ctx.sizes))
            if step.row is not None:
                out[step.row] = t
        if m.pid is not None:
            hwm = vm_status(m.pid, "VmHWM")
            if hwm is not None:
                ctx.peak_rss.setdefault(target.name, []).append(hwm / MIB)
                out["_vmhwm_mib"] = hwm / MIB
    return out


def fuse_inodes() -> int | None:
    """Active fuse_inode objects in the kernel (all FUSE mounts): shows that forgets happened."""
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open("/proc/slabinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("fuse_inode "):
                return int(line.split()[1])
    return None


def settle_rss(pid: int, quiet_for: float = 2.0, timeout: float = 20.0) -> int | None:
    """VmRSS once it stopped changing for *quiet_for* seconds (forgets arrive asynchronously)."""
    last = vm_status(pid, "VmRSS")
    since = time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = vm_status(pid, "VmRSS")
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            break
    return last


def run_lookups(ctx: Context, target: Target) -> dict[str, float]:
    out: dict[str, float] = {}
    with target.mounted([ctx.data.lookups]) as m:
        assert m.pid is not None
        base = vm_status(m.pid, "VmRSS")
        out["_rss_mounted_mib"] = (base or 0) / MIB
        out["_lookup_walk_s"] = run_cmd(CMD_LOOKUPS, m.root, ctx.data, 0)
        rss = vm_status(m.pid, "VmRSS")
        out["_fuse_inodes_after_lookups"] = fuse_inodes() or 0
        if rss is not None:
            out["rss_lookups"] = rss / MIB
        if ctx.root_user:
            drop_caches(2)  # the kernel drops unused dentries and inodes: FORGET for each
            settled = settle_rss(m.pid)
            out["_fuse_inodes_after_forget"] = fuse_inodes() or 0
            if settled is not None:
                out["rss_forget"] = settled / MIB
    return out


def run_layers(ctx: Context, target: Target) -> dict[str, float]:
    out: dict[str, float] = {}
    for count in (ctx.sizes.layers, 1):
        with target.mounted(ctx.data.layer_dirs(count)) as m:
            assert m.ready_seconds is not None
            out[f"mount_ready_{count}"] = m.ready_seconds
            out[f"lookup_{count}"] = run_cmd(CMD_DEEP_STAT, m.root, ctx.data, 0)
    return out


# --- the run -----------------------------------------------------------------------------------

def run_all(ctx: Context, targets: list[Target], names: list[str], reps: int) -> None:
    jobs: list[tuple[str, Callable[[Target], dict[str, float]], list[Target]]] = []
    for w in WORKLOADS:
        if w.name in names:
            if not ctx.root_user and all(s.cold for s in w.steps):
                continue
            job: Callable[[Target], dict[str, float]] = functools.partial(run_workload, ctx, w)
            label = w.name + ("" if len(w.rows) != 1 else f" [{w.rows[0]}]")
            jobs.append((label, job, targets))
    fuse = [t for t in targets if t.is_fuse]
    if "lookups" in names and fuse:
        jobs.append(("lookups", lambda t: run_lookups(ctx, t), fuse))
    if "layers" in names and fuse:
        jobs.append(("layers", lambda t: run_layers(ctx, t), fuse))
    for label, job, job_targets in jobs:
        for rep in range(reps):
            line = [f"  {label} rep {rep + 1}/{reps}:"]
            for target in rotation(job_targets, rep):
                try:
                    out = job(target)
                except BenchError as e:
                    msg = f"{label} on {target.name}, rep {rep + 1}: {e}"
                    ctx.failures.append(msg)
                    say(f"  FAILED {msg}")
                    continue
                ctx.runs.append({"workload": label, "rep": rep, "target": target.name, **out})
                shown = []
                for row, value in out.items():
                    if not row.startswith("_"):
                        ctx.record(row, target.name, value)
                        unit = ROW_BY_KEY[row].unit
                        shown.append(f"{value:.3g}{'' if unit == 's' else ' MiB'}")
                line.append(f"{target.name} {'/'.join(shown)}")
            say(" ".join(line))
    for name, values in ctx.peak_rss.items():
        ctx.results.setdefault("peak_rss", {})[name] = [max(values)]


def medians(ctx: Context) -> dict[str, dict[str, float]]:
    return {row: {t: statistics.median(v) for t, v in per.items() if v}
            for row, per in ctx.results.items()}


def ratio(med: dict[str, float], a: str, b: str) -> float | None:
    if a in med and b in med and med[b] > 0:
        return med[a] / med[b]
    return None


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "MiB":
        return f"{v:.0f} MiB"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def table(meds: dict[str, dict[str, float]], targets: list[str], sizes: Sizes) -> str:
    cols = [*targets]
    head = ["workload", *cols, "ovd/fovl", "ovd/kern", "noise", "goal (ovd/fovl)"]
    lines: list[list[str]] = []
    for row in ROWS:
        med = meds.get(row.key)
        if not med:
            continue
        r_f = ratio(med, OVERLAYD, FOVL)
        goal = row.goal
        if row.goal_ratio is not None and r_f is not None:
            goal += " ok" if r_f <= row.goal_ratio else " MISSED"
        lines.append([
            row.label, *[fmt_value(med.get(t), row.unit) for t in cols],
            fmt_ratio(r_f), fmt_ratio(ratio(med, OVERLAYD, KERNEL)),
            fmt_ratio(ratio(med, FOVL2, FOVL)), goal,
        ])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)]
    s = sizes
    out.append("")
    out.append(f"medians in seconds unless marked; ratios: lower is better for overlayd; noise = "
               f"{FOVL2} / {FOVL} (the same program twice). Sizes: {s.describe()['rootfs_files']}"
               f" rootfs files, {s.copyup_files} copy-ups, {s.create_files} creates, "
               f"{s.tar_files} files untarred, {s.dir_entries} entries listed, {s.write_mib} MiB "
               f"written, {s.big_file_mib} MiB read, {s.lookup_files} lookups, "
               f"{s.deep_files} names through {s.layers} layers.")
    return "\n".join(out)


def noise_summary(meds: dict[str, dict[str, float]]) -> str | None:
    rs = [r for row in ROWS if row.unit == "s"
          for r in [ratio(meds.get(row.key, {}), FOVL2, FOVL)] if r]
    if not rs:
        return None
    geo = math.exp(statistics.fmean(math.log(r) for r in rs))
    worst = max(rs, key=lambda r: abs(math.log(r)))
    return (f"noise ({FOVL2} / {FOVL} over {len(rs)} rows): geometric mean {geo:.2f}, "
            f"worst {worst:.2f}")


def extras_summary(meds: dict[str, dict[str, float]]) -> list[str]:
    notes = []
    many, one = meds.get("lookup_100", {}), meds.get("lookup_1", {})
    for t in (OVERLAYD, FOVL):
        if many.get(t) and one.get(t):
            r = many[t] / one[t]
            notes.append(f"{t}: lookups through 100 layers cost {r:.2f}x those through 1 layer "
                         f"(goal for overlayd: <= 2)")
    return notes


def chart(path: Path, meds: dict[str, dict[str, float]]) -> str:
    """Draw the ratios as grouped bars (log scale); returns what happened, for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("chart: matplotlib is not importable, skipped (install it with "
                "`.venv/bin/pip install -e '.[bench]'`, or pass --install-deps)")
    rows = [r for r in ROWS if r.key in meds and
            (ratio(meds[r.key], OVERLAYD, FOVL) or ratio(meds[r.key], OVERLAYD, KERNEL))]
    if not rows:
        return "chart: no ratios to draw"
    series = [("overlayd / fuse-overlayfs", FOVL), ("overlayd / kernel", KERNEL),
              ("noise: fuse-overlayfs / itself", FOVL2)]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.8 * len(rows) + 2), 5.5))
    width = 0.8 / len(series)
    for k, (label, other) in enumerate(series):
        a, b = (FOVL2, FOVL) if other == FOVL2 else (OVERLAYD, other)
        values = [ratio(meds[r.key], a, b) or math.nan for r in rows]
        ax.bar([i + (k - 1) * width for i in range(len(rows))], values, width, label=label)
    for i, r in enumerate(rows):
        if r.goal_ratio is not None:
            ax.plot([i - 0.45, i + 0.45], [r.goal_ratio] * 2, color="black", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.key for r in rows], rotation=40, ha="right")
    ax.set_ylabel("ratio of medians (lower is better for overlayd)")
    ax.set_title("overlayd vs fuse-overlayfs and the kernel overlay (black ticks: goals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    except OSError as e:
        return f"unavailable: {e}"
    lines = (r.stdout + r.stderr).strip().splitlines()
    name = os.path.basename(argv[0])
    return next((line for line in lines if name in line), lines[0] if lines else "")


def machine_info() -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "overlayd"],
                           check=False, capture_output=True, text=True).stdout.strip()
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "overlayd": tool_version([str(VENV_BIN / "overlayd"), "--version"]),
        "fuse_overlayfs": tool_version([FUSE_OVERLAYFS, "--version"]),
        "overlayd_commit": commit + (" (overlayd/ modified)" if dirty else ""),
    }


def inside_repo(path: Path) -> bool:
    return path.resolve().is_relative_to(REPO)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark overlayd against fuse-overlayfs, the kernel overlay and the plain "
                    "directory (run as root). Workloads: " + ", ".join(WORKLOAD_NAMES) + ".",
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="generated data, mounts and results (default: %(default)s)")
    p.add_argument("--scale", type=float, default=None,
                   help="size factor of the data and workloads (default 1; --quick: 0.1)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per workload and target (default 5; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="--scale 0.1 --reps 3")
    p.add_argument("--only", default=",".join(WORKLOAD_NAMES),
                   help="comma-separated workloads (default: all: %(default)s)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated targets (default: %(default)s)")
    p.add_argument("--tmpfs", action="store_true",
                   help="put every target's upper, workdir and scratch directory on a tmpfs "
                        "mounted for the run (root): the daemons without the disk under them")
    p.add_argument("--no-noise", action="store_true",
                   help=f"skip the noise target ({FOVL2}: fuse-overlayfs against itself)")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default: WORKDIR/results/bench-TIME.json)")
    p.add_argument("--png", type=Path, default=None,
                   help="ratio chart (default: the JSON file's name with .png)")
    p.add_argument("--install-deps", action="store_true",
                   help="pip install matplotlib into this venv if it is missing")
    p.add_argument("--build-only", action="store_true", help="build the data and stop")
    args = p.parse_args(list(argv))
    if args.scale is None:
        args.scale = 0.1 if args.quick else 1.0
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if not 0 < args.scale <= 10 or args.reps < 1:
        p.error("--scale must be in (0, 10] and --reps >= 1")
    return args


def select(raw: str, known: Sequence[str], what: str, aliases: dict[str, str]) -> list[str]:
    chosen = []
    for item in filter(None, (x.strip() for x in raw.split(","))):
        item = aliases.get(item, item)
        if item not in known:
            raise BenchError(f"unknown {what} {item!r}; known: {', '.join(known)}")
        chosen.append(item)
    if not chosen:
        raise BenchError(f"no {what} chosen")
    return list(dict.fromkeys(chosen))


def install_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if sys.prefix == sys.base_prefix:
            raise BenchError("--install-deps installs only into a venv; run scripts/bench with "
                             "the repository's .venv") from None
        say("installing matplotlib into", sys.prefix)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib>=3.7"],
                       check=True)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that every finally block unmounts."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str]) -> int:
    try:
        with terminate_as_interrupt():
            return bench(parse_args(argv))
    except BenchError as e:
        print(f"scripts/bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scripts/bench: interrupted (every mount made was unmounted)", file=sys.stderr)
        return 130


@contextlib.contextmanager
def run_tmpfs(run_dir: Path) -> Iterator[None]:
    """A tmpfs over *run_dir* for the run's upper, work and scratch directories, unmounted after.
    On this project's VM, ext4 without a journal skips the inodes freed in the last minutes when
    it allocates (recently_deleted), so a create workload's cost depended on which target's
    directory it ran in: fuse-overlayfs against itself differed by 1.35 in the create row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "overlayd-bench", str(run_dir)],
                   check=True)
    try:
        yield
    finally:
        done = subprocess.run(["umount", str(run_dir)], check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(run_dir)], check=False)


def bench(args: argparse.Namespace) -> int:
    names = select(args.only, WORKLOAD_NAMES, "workload", ALIASES)
    target_names = select(args.targets, TARGETS, "target", {"fovl": FOVL, "ovd": OVERLAYD})
    workdir: Path = args.workdir.resolve()
    if inside_repo(workdir):
        raise BenchError(f"--workdir {workdir} is inside the repository; choose another place")
    root_user = os.geteuid() == 0
    notes: list[str] = []
    if not root_user:
        notes.append("not root: the kernel target, the cold variants and the forget measurement "
                     "are skipped (drop_caches and the kernel overlay need root)")
        target_names = [t for t in target_names if t != KERNEL]
    if args.tmpfs and not root_user:
        raise BenchError("--tmpfs mounts a tmpfs: run as root")
    if not shutil.which(FUSERMOUNT):
        raise BenchError("fusermount3 not found (apt-get install fuse3)")
    if FOVL in target_names and not shutil.which(FUSE_OVERLAYFS):
        raise BenchError("fuse-overlayfs not found (apt-get install fuse-overlayfs), or leave it "
                         "out with --targets")
    if OVERLAYD in target_names and not (VENV_BIN / "overlayd").exists():
        raise BenchError(f"{VENV_BIN / 'overlayd'} not found: run ./scripts/setup first")
    if FOVL in target_names and not args.no_noise:
        target_names.append(FOVL2)
    if not target_names:
        raise BenchError("no target left to run")
    if args.install_deps:
        install_matplotlib()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    json_path: Path = (args.json or workdir / "results" / f"bench-{stamp}.json").resolve()
    png_path: Path = (args.png or json_path.with_suffix(".png")).resolve()
    for p in (json_path, png_path):
        if inside_repo(p):
            raise BenchError(f"{p} is inside the repository: results go elsewhere")

    sizes = Sizes(args.scale)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        lock = open(workdir / ".lock", "w")  # noqa: SIM115 - held for the whole run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BenchError(f"another scripts/bench is running in {workdir}") from None
    except OSError as e:
        raise BenchError(f"cannot use the work directory {workdir}: {e}") from None
    free_gib = shutil.disk_usage(workdir).free / 2**30
    need_gib = 0.5 + 3.5 * sizes.scale
    if free_gib < need_gib:
        raise BenchError(f"{workdir} has {free_gib:.1f} GiB free; this scale needs ~{need_gib:.1f}")

    data = ensure_data(workdir, sizes)
    if args.build_only:
        return 0
    run_dir = workdir / "run"
    targets = [Target(name, run_dir / name) for name in target_names]
    say(f"targets: {', '.join(target_names)}; workloads: {', '.join(names)}; "
        f"{args.reps} repetitions; scale {sizes.scale:g}"
        + ("; upper layers on a tmpfs" if args.tmpfs else ""))
    machine = machine_info()  # before the run: overlayd may change under a long one
    ctx = Context(data, sizes, root_user)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    with run_tmpfs(run_dir) if args.tmpfs else contextlib.nullcontext():
        try:
            for t in targets:
                t.cleanup()
            run_all(ctx, targets, names, args.reps)
        finally:
            for t in targets:
                t.cleanup()
    elapsed = time.perf_counter() - t0

    meds = medians(ctx)
    say("")
    say(table(meds, target_names, sizes))
    noise = noise_summary(meds)
    for note in [*([noise] if noise else []), *extras_summary(meds), *notes]:
        say(note)
    for failure in ctx.failures:
        say("FAILED:", failure)
    say(f"ran for {elapsed / 60:.1f} min")

    report = {
        "version": 1,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1),
        "argv": sys.argv,
        "machine": machine,
        "overlayd_commit_at_end": machine_info()["overlayd_commit"],
        "config": {"reps": args.reps, "targets": target_names, "workloads": names,
                   "root": root_user, "workdir": str(workdir), "data": str(data.root),
                   "run_on_tmpfs": args.tmpfs,
                   "kernel_options": KERNEL_PINNED, **sizes.describe()},
        "commands": {s.row or f"{w.name} (untimed)": s.cmd for w in WORKLOADS for s in w.steps}
        | {"lookups": CMD_LOOKUPS, "layers": CMD_DEEP_STAT},
        "rows": {
            row.key: {
                "label": row.label, "unit": row.unit, "goal": row.goal,
                "samples": ctx.results[row.key], "median": meds[row.key],
                "overlayd/fuse-overlayfs": ratio(meds[row.key], OVERLAYD, FOVL),
                "overlayd/kernel": ratio(meds[row.key], OVERLAYD, KERNEL),
                "noise": ratio(meds[row.key], FOVL2, FOVL),
            }
            for row in ROWS if row.key in meds
        },
        "noise": noise,
        "notes": [*extras_summary(meds), *notes],
        "failures": ctx.failures,
        "runs": ctx.runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    say(f"json: {json_path}")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    say(chart(png_path, meds))
    return 1 if ctx.failures else 0
