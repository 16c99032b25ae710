#!/usr/bin/env bash
# Shared set-up for scripts/demo and scripts/test: Debian packages, then the .venv with overlayd.
#
# Source it and call `overlayd_setup`, or run it directly. Safe to rerun: it installs Debian
# packages only when one is missing and reinstalls the venv only when pyproject.toml changed.
# Works as root with no stdin (CI=true), or as a user with sudo.
# Set PYTHON to choose the interpreter for a new venv (default: python3, which must be >= 3.11).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv
VENV_STAMP=$VENV/.overlayd-installed

# fuse3: fusermount3 and mount.fuse3; libfuse3-dev + pkg-config: pyfuse3's build;
# attr: getfattr/setfattr, used by the tests and handy for looking at whiteouts;
# patch: applies our pyfuse3 patch (setup_binding); zstd: overlayd import of zstd layers.
OVERLAYD_DEB_PACKAGES=(fuse3 libfuse3-dev pkg-config attr patch systemd strace zstd)  # systemd-analyze; strace for the fsync tests

# pyfuse3, built from its sdist with scripts/pyfuse3-$PYFUSE3_VERSION.patch (what it adds is at the
# top of the patch). The local version names the patch's hash, so a changed patch is rebuilt.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH=$REPO/scripts/pyfuse3-$PYFUSE3_VERSION.patch
OVERLAYD_MIN_PYTHON=(3 11)

setup_say() { printf '==> %s\n' "$*"; }
setup_die() { printf 'overlayd setup: %s\n' "$*" >&2; return 1; }

setup_deb_installed() {
    # Not `dpkg -s | grep -q`: grep leaves at the first match, and under pipefail the SIGPIPE
    # dpkg gets for a long description makes an installed package look missing.
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# Succeed if $1 is a Python >= 3.11.
setup_python_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (int(sys.argv[1]), int(sys.argv[2])))' \
        "${OVERLAYD_MIN_PYTHON[@]}" 2>/dev/null
}

setup_python_version() {
    "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "unknown"
}

# The Debian packages we need that are missing, one per line.
setup_missing_packages() {
    local p py=${PYTHON:-python3}
    for p in "${OVERLAYD_DEB_PACKAGES[@]}"; do
        setup_deb_installed "$p" || echo "$p"
    done
    # A new venv needs ensurepip (python3-venv on Debian), and pyfuse3 compiles a C extension
    # (python3-dev, gcc). Only Debian's own python3 can be fixed with apt.
    if ! command -v "$py" >/dev/null; then
        echo python3
        echo python3-venv
        echo python3-dev
    elif [[ $(command -v "$py") == /usr/bin/* ]]; then
        "$py" -c 'import ensurepip, venv' 2>/dev/null || echo python3-venv
        "$py" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
            2>/dev/null || echo python3-dev
    fi
    command -v cc >/dev/null || command -v gcc >/dev/null || echo gcc
}

setup_debian_packages() {
    local missing
    mapfile -t missing < <(setup_missing_packages | sort -u)
    ((${#missing[@]})) || return 0
    if ! command -v apt-get >/dev/null; then
        setup_die "missing packages (not a Debian system, install them by hand): ${missing[*]}"
        return
    fi
    local sudo=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null; then
            sudo=(sudo)
        else
            setup_die "not root and no sudo: as root, run: apt-get install -y ${missing[*]}"
            return
        fi
    fi
    setup_say "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || return
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" || return
}

setup_venv() {
    local py=${PYTHON:-python3}
    if [[ ! -e $VENV ]] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
        if ! command -v "$py" >/dev/null; then
            setup_die "no $py found; overlayd needs Python >= 3.11 (set PYTHON=/path/to/python3)"
            return
        fi
        if ! setup_python_ok "$py"; then
            setup_die "overlayd needs Python >= 3.11; $py is $(setup_python_version "$py")" \
                "(set PYTHON=/path/to/python3.11)"
            return
        fi
        # --clear: an existing .venv whose Python no longer runs (moved, or its base removed).
        if [[ -e $VENV ]]; then
            setup_say "$VENV does not run: recreating it"
        fi
        setup_say "creating $VENV with $py ($(setup_python_version "$py"))"
        rm -f "$VENV_STAMP"
        "$py" -m venv --clear "$VENV" || return
    fi
    if ! setup_python_ok "$VENV/bin/python"; then
        setup_die "$VENV has Python $(setup_python_version "$VENV/bin/python")," \
            "overlayd needs >= 3.11: remove $VENV and rerun"
        return
    fi
    setup_binding || return
    if [[ ! -e $VENV_STAMP || $REPO/pyproject.toml -nt $VENV_STAMP || ! -x $VENV/bin/overlayd ]]; then
        setup_say "installing overlayd and its test tools into $VENV (pip install -e '.[test]')"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${REPO}[test]" || return
        touch "$VENV_STAMP"
    fi
}

# The patched pyfuse3 in the venv, unless it is there already.
setup_binding() {
    local want have tmp rc=0
    want=$PYFUSE3_VERSION+overlayd.$(sha256sum "$PYFUSE3_PATCH" | cut -c1-12)
    have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' \
        2>/dev/null) || have=""
    [[ $have == "$want" ]] && return 0
    setup_say "building pyfuse3 $want (pyfuse3 $PYFUSE3_VERSION with scripts/${PYFUSE3_PATCH##*/})"
    tmp=$(mktemp -d -t overlayd-pyfuse3.XXXXXX) || return
    (
        set -e
        cd "$tmp"
        "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
            --no-binary :all: -d . "pyfuse3==$PYFUSE3_VERSION"
        echo "$PYFUSE3_SHA256  pyfuse3-$PYFUSE3_VERSION.tar.gz" | sha256sum -c --quiet
        tar xzf "pyfuse3-$PYFUSE3_VERSION.tar.gz"
        patch -s -p1 -d "pyfuse3-$PYFUSE3_VERSION" <"$PYFUSE3_PATCH"
        SETUPTOOLS_SCM_PRETEND_VERSION=$want "$VENV/bin/python" -m pip install -q \
            --disable-pip-version-check "./pyfuse3-$PYFUSE3_VERSION"
    ) || rc=$?
    rm -rf "$tmp"
    ((rc == 0)) || setup_die "could not build the patched pyfuse3 (exit $rc)"
}

setup_fuse_device() {
    if [[ ! -c /dev/fuse ]]; then
        printf 'overlayd setup: warning: no /dev/fuse (try: modprobe fuse); mounts will fail\n' >&2
    elif [[ ! -r /dev/fuse || ! -w /dev/fuse ]] && ! command -v fusermount3 >/dev/null; then
        printf 'overlayd setup: warning: /dev/fuse is not usable by %s and fusermount3 is missing\n' \
            "$(id -un)" >&2
    fi
    return 0
}

# Packages only some tests need (podman and runc: the mount_program end-to-end test; containerd:
# the snapshotter chain checked against a real containerd; docker.io and busybox-static: the
# container-layer tools checked against a private dockerd, tests/test_docker.py). Installed
# when apt can, and never fatal: without them those tests skip, saying why.
OVERLAYD_TEST_DEB_PACKAGES=(podman runc containerd docker.io busybox-static)

setup_optional_test_packages() {
    local p missing=()
    for p in "${OVERLAYD_TEST_DEB_PACKAGES[@]}"; do
        setup_deb_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if ((EUID != 0)) || ! command -v apt-get >/dev/null; then
        setup_say "not installing ${missing[*]} (needs root and apt): the tests that use them skip"
        return 0
    fi
    setup_say "installing Debian packages for some tests: ${missing[*]}"
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" || {
        env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    } || setup_say "could not install ${missing[*]}: the tests that use them skip"
    return 0
}

overlayd_setup() {
    setup_debian_packages || return
    setup_venv || return
    setup_fuse_device
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    overlayd_setup
fi
