"""Tier 1: parse_options, validate and split_escaped, on strings and temp dirs (no mount)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.constants import MAX_LAYERS
from overlayd.errors import UsageError
from overlayd.options import MountOptions, parse_options, split_escaped, validate

PODMAN = ('lowerdir=/a/l/X:/a/l/Y,upperdir=/a/diff,workdir=/a/work,,volatile,'
          'context="system_u:object_r:container_file_t:s0"')


def outcome(option_strings: list[str]) -> str:
    """The UsageError's message, or "" when the options parse."""
    try:
        parse_options(option_strings)
    except UsageError as e:
        return str(e)
    return ""


def usage_error(*option_strings: str) -> str:
    with pytest.raises(UsageError) as excinfo:
        parse_options(option_strings)
    return str(excinfo.value)


# --- parse_options -------------------------------------------------------------------------


def test_minimal_lowerdir_only() -> None:
    opts = parse_options(["lowerdir=/l"])
    assert opts == MountOptions((b"/l",))
    assert opts.upperdir is None
    assert opts.workdir is None
    assert not opts.writable
    assert opts.fsync is True


def test_lowerdirs_top_first() -> None:
    opts = parse_options(["lowerdir=/top:/middle:/bottom"])
    assert opts.lowerdirs == (b"/top", b"/middle", b"/bottom")


def test_lowerdir_escapes_colon_and_comma() -> None:
    opts = parse_options([r"lowerdir=/a\:b:/c\,d:/e\\f,upperdir=/u\,1,workdir=/w\:2"])
    assert opts.lowerdirs == (b"/a:b", b"/c,d", b"/e\\f")
    assert opts.upperdir == b"/u,1"
    assert opts.workdir == b"/w:2"


def test_several_option_strings_are_merged() -> None:
    opts = parse_options(["lowerdir=/l", "upperdir=/u,workdir=/w", "ro"])
    assert opts.lowerdirs == (b"/l",)
    assert opts.upperdir == b"/u"
    assert opts.workdir == b"/w"
    assert opts.read_only
    assert not opts.writable


def test_later_lowerdir_replaces_earlier() -> None:
    assert parse_options(["lowerdir=/a", "lowerdir=/b:/c"]).lowerdirs == (b"/b", b"/c")


@pytest.mark.parametrize("text", [
    "lowerdir=/l,,", ",lowerdir=/l", "lowerdir=/l,", ",,,lowerdir=/l,,,", "",
])
def test_empty_items_are_ignored(text: str) -> None:
    opts = parse_options([text, "lowerdir=/l"] if text == "" else [text])
    assert opts == MountOptions((b"/l",))


def test_podman_string() -> None:
    opts = parse_options([PODMAN])
    assert opts.lowerdirs == (b"/a/l/X", b"/a/l/Y")
    assert opts.upperdir == b"/a/diff"
    assert opts.workdir == b"/a/work"
    assert opts.fsync is False  # volatile
    assert opts.writable
    # The SELinux label is accepted, quotes and colons included, and has no effect.
    assert opts.ignored == ('context="system_u:object_r:container_file_t:s0"',)
    assert opts.fuse_options == frozenset()


def test_podman_context_with_mcs_categories() -> None:
    opts = parse_options(['lowerdir=/l,context="system_u:object_r:container_file_t:s0:c1,c2"'])
    assert opts.ignored == ('context="system_u:object_r:container_file_t:s0:c1,c2"',)


def test_podman_uidmapping() -> None:
    opts = parse_options([PODMAN + ",uidmapping=:0:100000:65536,gidmapping=:0:100000:65536"])
    assert opts.uidmap.ranges == opts.gidmap.ranges == ((0, 100000, 65536),)


@pytest.mark.parametrize("key", ["ino32_t"])
def test_known_but_not_yet(key: str) -> None:
    assert usage_error(f"lowerdir=/l,{key}") == f"option {key!r} is not supported yet"


def test_fuse_overlayfs_static_nlink() -> None:
    assert parse_options(["lowerdir=/l"]).static_nlink is False
    assert parse_options(["lowerdir=/l,static_nlink"]).static_nlink is True


def test_fuse_overlayfs_noacl_turns_acls_off() -> None:
    opts = parse_options(["lowerdir=/l,noacl"])
    assert (opts.acl, opts.ignored) == (False, ())
    assert parse_options(["lowerdir=/l"]).acl is True


def test_xattr_permissions_is_known() -> None:
    assert "unknown" not in outcome(["lowerdir=/l,xattr_permissions=2"])


def test_mount8_flags_accepted() -> None:
    opts = parse_options(["lowerdir=/l,rw,nodev,nosuid,_netdev,x-systemd.automount,noatime"])
    assert opts.fuse_options == frozenset({"rw", "nodev", "nosuid", "noatime"})
    assert opts.ignored == ("_netdev", "x-systemd.automount")
    assert not opts.read_only


def test_mount_fuse3_helper_flags() -> None:
    opts = parse_options(["lowerdir=/l,upperdir=/u,workdir=/w,rw,dev,suid,defaults,nofail"])
    assert opts.fuse_options == frozenset({"rw", "dev", "suid"})
    assert opts.ignored == ("defaults", "nofail")
    assert opts.writable


def test_passthrough_and_fsname() -> None:
    opts = parse_options(["lowerdir=/l,allow_other,default_permissions,fsname=ctr"])
    assert opts.fuse_options == frozenset({"allow_other", "default_permissions", "fsname=ctr"})


def test_ro_makes_read_only() -> None:
    opts = parse_options(["lowerdir=/l,upperdir=/u,workdir=/w,ro"])
    assert opts.read_only
    assert not opts.writable
    assert "ro" in opts.fuse_options
    assert "rw" not in opts.fuse_options


def test_last_of_ro_rw_wins() -> None:
    opts = parse_options(["lowerdir=/l,upperdir=/u,workdir=/w,ro", "rw"])
    assert not opts.read_only
    assert opts.writable
    assert opts.fuse_options == frozenset({"rw"})


def test_last_of_conflicting_flags_wins() -> None:
    opts = parse_options(["lowerdir=/l,nodev,nosuid,noexec", "dev,suid,exec"])
    assert opts.fuse_options == frozenset({"dev", "suid", "exec"})


@pytest.mark.parametrize("item", ["bogus", "bogus=1", "lowerdirs=/x", "ro=1", "volatile=1",
                                  "fsync=2", "allow_other=1"])
def test_unknown_option_named(item: str) -> None:
    assert usage_error(f"lowerdir=/l,{item}") == f"unknown option {item!r}"


def test_missing_lowerdir() -> None:
    assert usage_error("upperdir=/u,workdir=/w") == "missing lowerdir= option"
    assert usage_error("") == "missing lowerdir= option"


@pytest.mark.parametrize("value", ["a::b", "a:", ":a", ""])
def test_lowerdir_with_empty_element(value: str) -> None:
    assert usage_error(f"lowerdir={value}") == f"lowerdir has an empty element: {value!r}"


@pytest.mark.parametrize(("item", "message"), [
    ("upperdir=", "upperdir= is empty"),
    ("workdir=", "workdir= is empty"),
])
def test_empty_upper_or_work(item: str, message: str) -> None:
    assert usage_error(f"lowerdir=/l,{item}") == message


def test_upperdir_without_workdir() -> None:
    assert usage_error("lowerdir=/l,upperdir=/u") == "upperdir= needs workdir="


def test_workdir_without_upperdir() -> None:
    assert usage_error("lowerdir=/l,workdir=/w") == "workdir= needs upperdir="


def test_trailing_backslash() -> None:
    assert "trailing backslash" in usage_error("lowerdir=/l\\")


@pytest.mark.parametrize("item", ["index=off", "metacopy=off", "nfs_export=off", "xino=auto",
                                  "uuid=null"])
def test_pinned_options_with_our_value(item: str) -> None:
    assert parse_options([f"lowerdir=/l,{item}"]).ignored == (item,)


@pytest.mark.parametrize(("item", "allowed"), [
    ("index=on", "off"),
    ("metacopy=on", "off"),
    ("nfs_export=on", "off"),
])
def test_pinned_options_refused(item: str, allowed: str) -> None:
    key = item.partition("=")[0]
    assert usage_error(f"lowerdir=/l,{item}") == (
        f"option {item!r} is not supported ({key}= takes {allowed})")


@pytest.mark.parametrize(("value", "create", "follow"), [
    ("on", True, True), ("follow", False, True), ("off", False, True),
    ("nofollow", False, False),
])
def test_redirect_dir(value: str, create: bool, follow: bool) -> None:
    opts = parse_options([f"lowerdir=/l,redirect_dir={value}"])
    assert (opts.redirect_create, opts.redirect_follow) == (create, follow)


def test_redirect_dir_default_follows_as_the_kernel() -> None:
    # The kernel's redirect_dir=off follows redirects when redirect_always_follow is set,
    # as Debian's kernels have it.
    opts = parse_options(["lowerdir=/l"])
    assert (opts.redirect_create, opts.redirect_follow) == (False, True)


@pytest.mark.parametrize("item", ["redirect_dir=yes", "redirect_dir"])
def test_redirect_dir_bad_value(item: str) -> None:
    assert usage_error(f"lowerdir=/l,{item}") == (
        f"option {item!r} is not supported (redirect_dir= takes follow, nofollow, off, on)")


def test_max_layers_accepted() -> None:
    opts = parse_options(["lowerdir=" + ":".join(f"/l{i}" for i in range(MAX_LAYERS))])
    assert len(opts.lowerdirs) == MAX_LAYERS


def test_too_many_layers() -> None:
    message = usage_error("lowerdir=" + ":".join(f"/l{i}" for i in range(MAX_LAYERS + 1)))
    assert message == f"too many layers: {MAX_LAYERS + 1} lower layers (at most {MAX_LAYERS})"


def test_max_lower_layers_with_upper_accepted() -> None:
    lowers = ":".join(f"/l{i}" for i in range(MAX_LAYERS))
    opts = parse_options([f"lowerdir={lowers},upperdir=/u,workdir=/w"])
    assert len(opts.lowerdirs) == MAX_LAYERS


@pytest.mark.parametrize(("items", "fsync"), [
    ("", True), ("fsync=1", True), ("fsync=0", False), ("volatile", False),
    ("fsync=0,fsync=1", True),
])
def test_fsync(items: str, fsync: bool) -> None:
    assert parse_options([f"lowerdir=/l,{items}"]).fsync is fsync


@pytest.mark.parametrize(("items", "busy_poll"), [
    ("", None), ("busy_poll=0", 0), ("busy_poll=50", 50), ("busy_poll=100000", 100000),
    ("busy_poll=7,busy_poll=9", 9),
])
def test_busy_poll(items: str, busy_poll: int | None) -> None:
    assert parse_options([f"lowerdir=/l,{items}"]).busy_poll == busy_poll


@pytest.mark.parametrize("item", ["busy_poll", "busy_poll=", "busy_poll=-1", "busy_poll=x",
                                  "busy_poll=100001", "busy_poll=\u0661"])
def test_busy_poll_refused(item: str) -> None:
    with pytest.raises(UsageError, match="busy_poll"):
        parse_options([f"lowerdir=/l,{item}"])


def test_options_are_frozen() -> None:
    opts = parse_options(["lowerdir=/l"])
    with pytest.raises(AttributeError):
        opts.read_only = True  # type: ignore[misc]


# --- split_escaped --------------------------------------------------------------------------


def escape(text: str, sep: str) -> str:
    return text.replace("\\", "\\\\").replace(sep, "\\" + sep)


@pytest.mark.parametrize(("text", "parts"), [
    ("a:b", ["a", "b"]),
    (r"a\:b:c", ["a:b", "c"]),
    (r"a\\:b", ["a\\", "b"]),
    ("", [""]),
    (":", ["", ""]),
    (r"\x", ["x"]),
])
def test_split_escaped_examples(text: str, parts: list[str]) -> None:
    assert split_escaped(text, ":") == parts


def test_split_escaped_trailing_backslash() -> None:
    with pytest.raises(UsageError, match="trailing backslash"):
        split_escaped("a\\", ":")


@given(st.lists(st.text()), st.sampled_from([":", ",", "=", "\0"]))
def test_split_escaped_round_trip(parts: list[str], sep: str) -> None:
    if not parts:
        parts = [""]
    assert split_escaped(sep.join(escape(p, sep) for p in parts), sep) == parts


def escape_lowerdir(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


@given(st.lists(st.text(min_size=1), min_size=1, max_size=20))
def test_lowerdir_round_trip(paths: list[str]) -> None:
    opts = parse_options(["lowerdir=" + ":".join(escape_lowerdir(p) for p in paths)])
    assert opts.lowerdirs == tuple(os.fsencode(p) for p in paths)


OPTION_WORDS = st.sampled_from([
    "lowerdir", "upperdir", "workdir", "ro", "rw", "volatile", "fsync", "context", "x-a",
    "redirect_dir", "index", "uidmapping", "nodev", "fsname", "bogus", "",
])
OPTION_VALUES = st.text(alphabet="/a:,\\\"0=off", max_size=6)
OPTION_TEXT = st.lists(
    st.tuples(OPTION_WORDS, st.sampled_from(["", "="]), OPTION_VALUES).map("".join),
    max_size=8).map(",".join)


@given(st.lists(st.one_of(st.text(), OPTION_TEXT), max_size=3))
def test_parse_options_never_crashes(option_strings: list[str]) -> None:
    try:
        opts = parse_options(option_strings)
    except UsageError as e:
        message = str(e)
    else:
        assert isinstance(opts, MountOptions)
        assert opts.lowerdirs
        assert all(opts.lowerdirs)
        assert (opts.upperdir is None) == (opts.workdir is None)
        return
    assert message
    assert "\n" not in message


# --- validate ---------------------------------------------------------------------------------


def b(path: Path) -> bytes:
    return os.fsencode(path)


def opts_for(stack: dict[str, Path], *, lowers: tuple[str, ...] = ("lower1", "lower2"),
             upper: str | None = "upper", work: str | None = "work",
             read_only: bool = False) -> MountOptions:
    return MountOptions(
        tuple(b(stack[name]) for name in lowers),
        None if upper is None else b(stack[upper]),
        None if work is None else b(stack[work]),
        read_only=read_only,
    )


def validate_error(opts: MountOptions, mountpoint: bytes | None) -> str:
    with pytest.raises(UsageError) as excinfo:
        validate(opts, mountpoint)
    return str(excinfo.value)


def test_validate_good_stack(stack: dict[str, Path]) -> None:
    validate(opts_for(stack), b(stack["mnt"]))
    validate(opts_for(stack, upper=None, work=None), b(stack["mnt"]))


def test_validate_missing_layer(stack: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    opts = MountOptions((b(stack["lower1"]), b(missing)))
    assert validate_error(opts, b(stack["mnt"])) == (
        f"lowerdir {missing}: No such file or directory")


def test_validate_layer_is_a_file(stack: dict[str, Path], tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_bytes(b"x")
    opts = MountOptions((b(afile),))
    assert validate_error(opts, b(stack["mnt"])) == f"lowerdir {afile}: not a directory"


def test_validate_layer_below_a_file(stack: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    below = tmp_path / "file" / "sub"
    opts = MountOptions((b(below),))
    assert validate_error(opts, b(stack["mnt"])) == f"lowerdir {below}: Not a directory"


def test_validate_missing_upper(stack: dict[str, Path], tmp_path: Path) -> None:
    stack["upper"] = tmp_path / "gone"
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        f"upperdir {stack['upper']}: No such file or directory")


def test_validate_missing_mountpoint_dir(stack: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "nomnt"
    assert validate_error(opts_for(stack), b(mnt)) == (
        f"mountpoint {mnt}: No such file or directory")


def test_validate_mountpoint_none(stack: dict[str, Path]) -> None:
    assert validate_error(opts_for(stack), None) == "missing mountpoint"


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="overlayd-test-") as d:
        yield Path(d)


def test_validate_workdir_on_other_filesystem(stack: dict[str, Path], shm_dir: Path) -> None:
    if os.stat(shm_dir).st_dev == os.stat(stack["upper"]).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as tmp_path")
    stack["work"] = shm_dir
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        "workdir and upperdir must be on the same filesystem")


def test_validate_workdir_inside_upperdir(stack: dict[str, Path]) -> None:
    stack["work"] = stack["upper"] / "work"
    stack["work"].mkdir()
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        "workdir and upperdir must be separate subtrees")


def test_validate_upperdir_inside_workdir(stack: dict[str, Path]) -> None:
    stack["upper"] = stack["work"] / "upper"
    stack["upper"].mkdir()
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        "workdir and upperdir must be separate subtrees")


def test_validate_workdir_equal_upperdir(stack: dict[str, Path]) -> None:
    stack["work"] = stack["upper"]
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        "workdir and upperdir must be separate subtrees")


def test_validate_workdir_inside_upperdir_through_symlink(
        stack: dict[str, Path], tmp_path: Path) -> None:
    (stack["upper"] / "w").mkdir()
    (tmp_path / "link").symlink_to(stack["upper"] / "w")
    stack["work"] = tmp_path / "link"
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        "workdir and upperdir must be separate subtrees")


def test_validate_sibling_with_common_prefix_is_fine(stack: dict[str, Path],
                                                     tmp_path: Path) -> None:
    # /x/upper and /x/upper2 share a string prefix but are separate trees.
    stack["work"] = tmp_path / "upper2"
    stack["work"].mkdir()
    validate(opts_for(stack), b(stack["mnt"]))


def test_validate_upper_inside_lower(stack: dict[str, Path]) -> None:
    stack["upper"] = stack["lower2"] / "u"
    stack["upper"].mkdir()
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        f"upperdir overlaps lowerdir {stack['lower2']}")


def test_validate_lower_inside_upper(stack: dict[str, Path]) -> None:
    stack["lower1"] = stack["upper"] / "l"
    stack["lower1"].mkdir()
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        f"upperdir overlaps lowerdir {stack['lower1']}")


def test_validate_work_inside_lower(stack: dict[str, Path]) -> None:
    stack["work"] = stack["lower1"] / "w"
    stack["work"].mkdir()
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        f"workdir overlaps lowerdir {stack['lower1']}")


def test_validate_upper_equal_lower(stack: dict[str, Path]) -> None:
    stack["upper"] = stack["lower1"]
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        f"upperdir overlaps lowerdir {stack['lower1']}")


def test_validate_mountpoint_inside_layer(stack: dict[str, Path]) -> None:
    mnt = stack["lower2"] / "m"
    mnt.mkdir()
    assert validate_error(opts_for(stack), b(mnt)) == (
        f"mountpoint {mnt} is inside lowerdir {stack['lower2']}")


@pytest.mark.parametrize("layer", ["lower1", "upper", "work"])
def test_validate_mountpoint_equal_to_layer(stack: dict[str, Path], layer: str) -> None:
    what = "lowerdir" if layer.startswith("lower") else f"{layer}dir"
    assert validate_error(opts_for(stack), b(stack[layer])) == (
        f"mountpoint {stack[layer]} is inside {what} {stack[layer]}")


def test_validate_mountpoint_inside_upper(stack: dict[str, Path]) -> None:
    mnt = stack["upper"] / "m"
    mnt.mkdir()
    assert validate_error(opts_for(stack), b(mnt)) == (
        f"mountpoint {mnt} is inside upperdir {stack['upper']}")


def test_validate_layer_inside_mountpoint(stack: dict[str, Path]) -> None:
    stack["lower2"] = stack["mnt"] / "l"
    stack["lower2"].mkdir()
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        f"lowerdir {stack['lower2']} is inside the mountpoint")


def test_validate_workdir_inside_mountpoint(stack: dict[str, Path]) -> None:
    stack["work"] = stack["mnt"] / "w"
    stack["work"].mkdir()
    assert validate_error(opts_for(stack), b(stack["mnt"])) == (
        f"workdir {stack['work']} is inside the mountpoint")


def test_validate_upper_not_writable(stack: dict[str, Path]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may write any directory: os.access never refuses W_OK")
    stack["upper"].chmod(0o555)
    try:
        assert validate_error(opts_for(stack), b(stack["mnt"])) == (
            f"upperdir {stack['upper']}: not writable")
        # A read-only mount never writes the upper layer.
        validate(opts_for(stack, read_only=True), b(stack["mnt"]))
    finally:
        stack["upper"].chmod(0o755)
