"""What one open file writes, the others see at once, as through the kernel's overlayfs: a reader
whose pages the kernel caches, a shared mapping, and the size. overlayd writes a file open for
writing only past the kernel's page cache (FOPEN_DIRECT_IO) and a read-write one through it; the
kernel must drop what the first leaves stale in the cache of the second kind.
"""

from __future__ import annotations

import mmap
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_kernel_overlay
from tests.mounting import kernel_shows, mounted_pair

pytestmark = [pytest.mark.kernel, pytest.mark.mounted, needs_kernel_overlay, needs_fuse]

SIZE = 3 * 4096 + 100


def _lower(lowers: list[Path]) -> None:
    (lowers[0] / "lower").write_bytes(b"l" * SIZE)


def _seen(mnt: Path, name: str, writer_flags: int) -> list[bytes | int]:
    """Read *name* (cached and mapped), write it through another fd, and read it again."""
    seen: list[bytes | int] = []
    reader = os.open(mnt / name, os.O_RDONLY)
    writer = os.open(mnt / name, writer_flags)
    try:
        with mmap.mmap(reader, SIZE, prot=mmap.PROT_READ) as mapped:
            seen += [os.pread(reader, SIZE, 0), mapped[:]]
            os.pwrite(writer, b"ABC", 4094)  # across a page boundary
            os.pwrite(writer, b"tail", SIZE)  # past the end
            seen += [os.pread(reader, SIZE + 10, 0), mapped[:], os.fstat(reader).st_size]
            os.ftruncate(writer, 10)
            seen += [os.pread(reader, SIZE, 0), os.fstat(reader).st_size]
    finally:
        os.close(writer)
        os.close(reader)
    return seen


@pytest.mark.parametrize("writer_flags", [os.O_WRONLY, os.O_RDWR])
@pytest.mark.parametrize("name", ["lower", "upper"])
def test_readers_see_writes_at_once(tmp_path: Path, writer_flags: int, name: str) -> None:
    results = []
    with mounted_pair(tmp_path, _lower, layers=1) as pair:
        for mnt in (pair.kernel, pair.ours):
            if name == "upper":
                (mnt / "upper").write_bytes(b"u" * SIZE)
            else:  # copied up before the reader opens it: the kernel's reader would stay below
                os.close(os.open(mnt / name, os.O_WRONLY))
            results.append(_seen(mnt, name, writer_flags))
    kernel, ours = results
    kernel_shows(kernel[2][4094:4097] == b"ABC" and kernel[4] == SIZE + 4, "the write seen")
    assert ours == kernel


WRITERS = {
    "cp": "cp src.bin out.bin",
    "sendfile": ("python3 -c 'import os; i = os.open(\"src.bin\", os.O_RDONLY); "
                 "o = os.open(\"out.bin\", os.O_WRONLY | os.O_CREAT, 0o644); "
                 "n = os.fstat(i).st_size; off = 0\n"
                 "while off < n: off += os.sendfile(o, i, off, n - off)'"),
    "O_DIRECT": ("dd if=src.bin of=out.bin bs=1M oflag=direct status=none; "
                 "dd if=out.bin of=back.bin bs=1M iflag=direct status=none; cmp out.bin back.bin"),
    "pwritev": ("python3 -c 'import os; o = os.open(\"out.bin\", os.O_WRONLY | os.O_CREAT, 0o644); "
                "os.pwritev(o, [b\"a\" * 5000, b\"b\" * 3], 4093); "
                "os.pwritev(o, [b\"c\" * 70000], 1)'"),
    "append": "for i in 1 2 3; do cat src.bin >> out.bin; done",
}


@pytest.mark.parametrize("how", list(WRITERS))
def test_every_way_of_writing_a_write_only_file(tmp_path: Path, how: str) -> None:
    """The tools' ways into a file open for writing only (copy_file_range falling back to
    splice, sendfile, O_DIRECT, vectored writes, O_APPEND) give the kernel's bytes; and what
    O_DIRECT wrote, O_DIRECT reads back."""
    data = bytes(range(256)) * 8193  # not a whole number of pages
    results = []
    with mounted_pair(tmp_path, _lower, layers=1) as pair:
        for mnt in (pair.kernel, pair.ours):
            (mnt / "src.bin").write_bytes(data)
            done = subprocess.run(["sh", "-ec", WRITERS[how]], cwd=mnt)
            results.append((done.returncode, (mnt / "out.bin").read_bytes()))
    kernel_shows(len(results[0][1]) > 4096, f"{how} wrote {len(results[0][1])} bytes")
    assert results[1] == results[0]
