"""The native CPU kernels' build (int4 and int8, one library): cached per machine and compiler, never loaded
half-written, and a machine that cannot build it serves int4 through tinygemm with a warning naming why."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from data_plane.model.quant import int4, int8, make_quant_linear, native


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build of the library into an empty cache (tmp_path/cache/openlora/kernels); the process's own
    library is loaded again after the test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native._load.cache_clear()
    yield tmp_path / "cache" / "openlora" / "kernels"
    monkeypatch.undo()
    native._load.cache_clear()


def test_the_library_is_built_once_into_the_cache_and_named_by_its_inputs(fresh_build, monkeypatch):
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    built = sorted(p.name for p in fresh_build.iterdir())
    assert built == [kernel.path.name, kernel.path.name + ".sha256"]  # no partial file
    assert kernel.path.name.startswith("openlora_cpu-") and kernel.path.name.endswith(".so")
    # Another compiler identity (here one that answers --version as the real one does with a word more,
    # and then fails to build) is another name: built again, and refused.
    real = native._compiler()[0]
    native._load.cache_clear()
    wrapper = fresh_build.parent / "cc-that-cannot-build"
    wrapper.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] && {{ {real} --version; echo patched; exit 0; }}\nexit 1\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.native_kernels() is None
    assert "failed to build" in native.native_kernels_problem()
    # The real compiler again: the cached library is found and loaded, not built anew.
    monkeypatch.delenv("CC")
    native._load.cache_clear()
    before = kernel.path.stat().st_mtime_ns
    again = native.native_kernels()
    assert again is not None and again.path == kernel.path and kernel.path.stat().st_mtime_ns == before


def test_a_damaged_cached_library_is_built_again(fresh_build, tmp_path):
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    # Cut short, as by a bad copy of the cache; written beside and renamed over it, as this process has the
    # original mapped. A new process (the loader keeps one copy of a path per process) meets the damage.
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(kernel.path.read_bytes()[:4096])
    os.replace(damaged, kernel.path)
    probe = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from data_plane.model.quant import native\n"
        "k = native.native_kernels()\n"
        "print('loaded', k is not None and not k.cached, native.native_kernels_problem())\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "loaded True None" in done.stdout  # built by that process, not found cached
    assert "is damaged; building it again" in done.stderr
    assert kernel.path.stat().st_size > 4096


def test_a_machine_without_a_compiler_serves_int4_through_tinygemm_and_says_why(
    fresh_build, monkeypatch, caplog
):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.native_kernels() is None
        layer = make_quant_linear("int4", 128, 32, torch.device("cpu"))
    assert "does not run" in native.native_kernels_problem()
    assert any("take PyTorch's kernels" in r.getMessage() for r in caplog.records)
    assert layer.native is None and layer.kernel_name.startswith("tinygemm")
    w = torch.randn(32, 128)
    layer.load_weight(w)
    x = torch.randn(3, 128)
    want = layer.reference(x)
    assert ((layer.kernel(x) - want).abs().max() / want.abs().max()) < 1e-2  # bfloat16, but served


def test_a_failed_build_leaves_no_partial_file_and_falls_back(fresh_build, monkeypatch, tmp_path):
    wrapper = tmp_path / "cc-writes-half"
    # Answers --version, then writes part of its output file and fails, as a compiler killed mid-write.
    wrapper.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "half 1.0"; exit 0; }\n'
        'for a; do case "$prev" in -o) printf garbage > "$a";; esac; prev="$a"; done\n'
        'echo "error: out of memory" >&2; exit 1\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.native_kernels() is None
    assert "failed to build the CPU kernels: error: out of memory" in native.native_kernels_problem()
    assert list(fresh_build.iterdir()) == []  # neither the partial output nor a final name


def test_a_compiler_writing_bytes_of_another_encoding_builds_or_falls_back(
    fresh_build, monkeypatch, tmp_path
):
    # A compiler's messages in a legacy locale (Latin-1 here), bytes this process does not decode: its
    # version still names the build and a failure still falls back naming its message (both raised
    # UnicodeDecodeError out of the model's build).
    compiler = native._compiler()[0]
    latin1 = tmp_path / "cc-latin1"
    latin1.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { printf "cc 1.0 (d\\351j\\340)\\n"; exit 0; }\n'
        '[ -n "$FAIL" ] && { printf "Fehler: \\374berlauf\\n" >&2; exit 1; }\n'
        f'exec {compiler} "$@"\n'
    )
    latin1.chmod(latin1.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(latin1))
    assert native.native_kernels() is not None, native.native_kernels_problem()
    native._load.cache_clear()
    monkeypatch.setenv("FAIL", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    assert native.native_kernels() is None
    assert "failed to build the CPU kernels: Fehler: " in native.native_kernels_problem()


def test_an_unwritable_cache_builds_into_a_private_directory_left_to_no_one(
    fresh_build, monkeypatch, tmp_path
):
    if os.geteuid() == 0:
        # root writes through permission bits: make the cache path a file instead, which nobody can mkdir
        fresh_build.parent.parent.mkdir(parents=True)
        fresh_build.parent.write_text("not a directory")
    else:
        fresh_build.parent.mkdir(parents=True)
        fresh_build.parent.chmod(0o500)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    assert kernel.path.parent.parent == tmp_path and kernel.path.parent.name.startswith("openlora-kernels-")
    # Gone once loaded (the library stays mapped): every worker start here would leave one more behind.
    assert not kernel.path.parent.exists()
    q, scale, offset = int4.quantize_int4(torch.randn(16, 128), 128)
    x = torch.randn(3, 128)
    want = x @ int4.dequantize_int4(q, scale, offset).T
    assert torch.allclose(
        kernel.int4_mm(x, kernel.int4_weight(int4.pack_native(q, 128), scale, offset, 128)), want, atol=1e-4
    )


def test_the_kernel_refuses_tensors_it_would_misread():
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    q, scale, offset = int4.quantize_int4(torch.randn(16, 128), 128)
    codes = int4.pack_native(q, 128)
    x = torch.randn(2, 128)
    for bad_x in (x.double(), x.T.contiguous().T, x[:, :64]):  # float64, not contiguous, too narrow
        with pytest.raises(ValueError, match="x must be contiguous float32"):
            kernel.int4_mm(bad_x, kernel.int4_weight(codes, scale, offset, 128))
    with pytest.raises(ValueError, match="scale must be"):
        kernel.int4_mm(x, kernel.int4_weight(codes, scale.float(), offset, 128))
    with pytest.raises(ValueError, match="group size 96"):
        kernel.int4_mm(x, kernel.int4_weight(codes, scale, offset, 96))
    with pytest.raises(ValueError, match="rows 3:20 outside 0:16"):
        kernel.int4_dequantize(kernel.int4_weight(codes, scale, offset, 128), 3, 20)
    q8, scale8 = int8.quantize_int8(torch.randn(16, 128))
    for bad_x in (
        x.double(),
        x.T.contiguous().T,
        torch.randn(2, 129),
        torch.randn(2, 100),
        torch.randn(2, 0),
        torch.tensor(1.0),  # no dimension to read a width from
    ):
        with pytest.raises(ValueError, match="x must be contiguous float32"):
            kernel.int8_mm(bad_x, kernel.int8_weight(q8, scale8))
    with pytest.raises(ValueError, match="qweight must be"):
        kernel.int8_mm(x, kernel.int8_weight(q8.T, scale8))  # not contiguous
    with pytest.raises(ValueError, match=r"scale must be contiguous bfloat16 \(16,\)"):
        kernel.int8_mm(x, kernel.int8_weight(q8, scale8[:8]))


def test_dequantize_refuses_a_weight_it_would_misread():
    # dequantize reads codes, scale and offset through the same pointers as mm: a scale too short for the
    # codes is read past its end, a group size that does not divide K writes past the output's rows.
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    q, scale, offset = int4.quantize_int4(torch.randn(16, 256), 128)
    codes = int4.pack_native(q, 128)
    for bad_scale in (scale[:, :1].contiguous(), scale[:4], scale.float(), scale.T.contiguous().T):
        with pytest.raises(ValueError, match="scale must be"):
            kernel.int4_dequantize(kernel.int4_weight(codes, bad_scale, offset, 128))
    with pytest.raises(ValueError, match="offset must be"):
        kernel.int4_dequantize(kernel.int4_weight(codes, scale, offset.half(), 128))
    with pytest.raises(ValueError, match="group size 96"):
        kernel.int4_dequantize(kernel.int4_weight(codes, scale, offset, 96))
    with pytest.raises(ValueError, match="codes must be contiguous uint8"):
        kernel.int4_dequantize(kernel.int4_weight(codes.T.contiguous().T, scale, offset, 128))
    with pytest.raises(ValueError, match="CPU tensors"):
        kernel.int4_dequantize(kernel.int4_weight(codes.to("meta"), scale, offset, 128))
    with pytest.raises(ValueError, match=r"codes must be \(N, K / 2\)"):
        kernel.int4_mm(torch.randn(2, 256), kernel.int4_weight(codes.view(-1), scale, offset, 128))


def test_nowhere_to_build_serves_int4_through_tinygemm(fresh_build, monkeypatch, tmp_path):
    # A read-only file system: neither the cache nor a temporary directory can be made. The worker serves
    # int4 (through tinygemm), it does not stop building its model.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))
    layer = make_quant_linear("int4", 128, 32, torch.device("cpu"))
    assert layer.native is None and "a-file" in native.native_kernels_problem()


def test_a_compiler_named_with_arguments_builds_a_library_of_its_own(fresh_build, monkeypatch):
    # CC="gcc -m32" or CC="gcc -ffast-math" builds another library than gcc alone: it must not be loaded
    # under the plain compiler's name (nor the plain one under its).
    plain = native.native_kernels()
    assert plain is not None, native.native_kernels_problem()
    native._load.cache_clear()
    monkeypatch.setenv("CC", f"{native._compiler()[0]} -DOPENLORA_ANOTHER_BUILD")
    other = native.native_kernels()
    assert other is not None, native.native_kernels_problem()
    assert not other.cached and other.path != plain.path


_HOSTILE_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void run_at_load(void) {
    FILE *marker = fopen(getenv("OPENLORA_TEST_MARKER"), "w");
    if (marker) fclose(marker);
}
int openlora_int4_vector_bits(void) { return 0; }
void openlora_int4_mm(void) {}
void openlora_int4_dequantize(void) {}
"""


@pytest.mark.parametrize("writable", ["cache", "parent"])
def test_a_library_planted_where_others_can_write_is_never_loaded(fresh_build, tmp_path, writable):
    # A shared cache (XDG_CACHE_HOME on a directory another user can write to): that user computes the
    # library's name (every input of it is public on the machine) and plants its own library there, with
    # the digest file beside it. Loading it runs that user's code in the worker.
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    source = tmp_path / "hostile.c"
    source.write_text(_HOSTILE_SOURCE)
    hostile = tmp_path / "hostile.so"
    subprocess.run([*native._compiler(), "-shared", "-fPIC", str(source), "-o", str(hostile)], check=True)
    digest = hashlib.sha256(hostile.read_bytes()).hexdigest()
    native._digest_path(kernel.path).write_text(digest + "\n")
    os.replace(hostile, kernel.path)
    (fresh_build if writable == "cache" else fresh_build.parent).chmod(0o777)
    marker = tmp_path / "hostile-code-ran"
    probe = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from data_plane.model.quant import native\n"
        "k = native.native_kernels()\n"
        "print('loaded', k.path.parent)\n"
    )
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OPENLORA_TEST_MARKER": str(marker),
    }
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert "not using the cache" in done.stderr
    assert f"loaded {fresh_build}" not in done.stdout


def test_a_cache_of_another_user_is_not_used(fresh_build, monkeypatch):
    fresh_build.mkdir(parents=True)
    owner = fresh_build.stat().st_uid
    with monkeypatch.context() as as_another_user:
        as_another_user.setattr(os, "geteuid", lambda: owner + 1)
        kernel = native.native_kernels()
        assert kernel is not None, native.native_kernels_problem()
        assert kernel.path.parent != fresh_build and list(fresh_build.iterdir()) == []
    native._load.cache_clear()
    assert native.native_kernels().path.parent == fresh_build  # its owner uses it


def test_a_relative_xdg_cache_home_is_ignored(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative-cache")
    monkeypatch.chdir(tmp_path)
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    assert kernel.path.parent == tmp_path / "home" / ".cache" / "openlora" / "kernels"
    assert not (tmp_path / "relative-cache").exists()


def test_no_home_directory_builds_into_a_private_directory(fresh_build, monkeypatch, tmp_path):
    # HOME unset and this uid without a passwd entry (a container run as an arbitrary uid): Path.home()
    # raises RuntimeError, which stopped the model's build.
    import pwd

    def no_entry(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    assert kernel.path.parent.parent == tmp_path and not kernel.path.parent.exists()  # removed once loaded


def test_a_build_of_another_process_with_the_same_pid_is_not_written_over(fresh_build, monkeypatch):
    # Workers in two containers sharing the cache can both be pid 7 and build at once. Stood for here by a
    # directory at the name a partial build of this pid took: the other build's file is not this one's.
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    for name in (kernel.path.name, kernel.path.name + ".sha256"):
        (fresh_build / name).unlink()
    (fresh_build / f".{kernel.path.name}.{os.getpid()}.partial").mkdir()
    native._load.cache_clear()
    assert native.native_kernels() is not None, native.native_kernels_problem()


def test_a_compiler_that_hangs_is_killed_with_what_it_started(fresh_build, monkeypatch, tmp_path):
    # The driver starts a child (as gcc starts cc1 and ld) and both hang: after the timeout neither runs,
    # and int4 serves through tinygemm.
    pid_file = tmp_path / "child.pid"
    wrapper = tmp_path / "cc-hangs"
    wrapper.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "hang 1.0"; exit 0; }\n'
        f"sleep 600 & echo $! > {pid_file}\nwait\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setattr(native, "_BUILD_TIMEOUT_S", 1)
    assert native.native_kernels() is None
    assert "timed out" in native.native_kernels_problem()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "the compiler's child outlived the timeout"


def test_an_interrupted_build_kills_the_compiler_with_what_it_started(tmp_path):
    # Ctrl-C raises KeyboardInterrupt in this process only: the compiler runs in a session of its own, out
    # of the terminal's reach. Stood for by a driver that interrupts its parent once its child runs and
    # the parent reads its output (more than a pipe holds: the parent is in the build, not starting it).
    pid_file = tmp_path / "child.pid"
    script = f"sleep 600 & echo $! > {pid_file}; head -c 1000000 /dev/zero; kill -USR1 $PPID; wait"

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            native._run(["sh", "-c", script], 60)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _running(child), "the compiler's child outlived the interrupt"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_process_that_leaves_the_compilers_session_holding_its_output_does_not_hold_the_build(tmp_path):
    # The driver exits and leaves a process of its own session (setsid) with its stdout: past the timeout
    # the build gives up without waiting for that process to end (it waited for as long as it ran).
    pid_file = tmp_path / "stray.pid"
    script = f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 30' & while [ ! -s {pid_file} ]; do :; done"
    with pytest.raises(subprocess.TimeoutExpired):
        native._run(["sh", "-c", script], 1)
    stray = int(pid_file.read_text())
    try:
        assert _running(stray), "the build waited for the stray process to end"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stray, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_changed_header_builds_a_library_of_its_own(fresh_build, monkeypatch, tmp_path):
    # The header both sources include is part of what names the library: an upgrade that changes only it
    # is not served by the library built before.
    first = native.native_kernels()
    assert first is not None, native.native_kernels_problem()
    changed = tmp_path / "quant_cpu.h"
    changed.write_text(native.HEADERS[0].read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "HEADERS", (changed,))
    native._load.cache_clear()
    second = native.native_kernels()
    assert second is not None and second.path != first.path and not second.cached


def test_partial_files_of_builds_killed_long_ago_are_removed_by_the_next_build(fresh_build, monkeypatch):
    # A worker killed while it compiled leaves its partial output (and digest) behind; the next build
    # removes those older than twice the build timeout, and leaves a recent one (a build that may still
    # be running) alone.
    fresh_build.mkdir(parents=True)
    old = fresh_build / ".openlora_cpu-0123456789abcdef.so.42-00.partial"
    old_digest = fresh_build / ".openlora_cpu-0123456789abcdef.so.42-00.partial.sha256"
    recent = fresh_build / ".openlora_cpu-0123456789abcdef.so.43-00.partial"
    for leftover in (old, old_digest, recent):
        leftover.write_bytes(b"half a library")
    long_ago = time.time() - 3 * native._BUILD_TIMEOUT_S
    for leftover in (old, old_digest):
        os.utime(leftover, (long_ago, long_ago))
    kernel = native.native_kernels()
    assert kernel is not None, native.native_kernels_problem()
    assert not old.exists() and not old_digest.exists()
    assert recent.exists()
