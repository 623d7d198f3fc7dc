"""The CPU allocator setting `ief` runs under (iefcli.allocator): when it applies, and that the CLI applies it."""

import subprocess
import sys

import pytest

from iefcli import allocator


@pytest.mark.parametrize("environ", [
    {"IEF_CPU_ALLOCATOR": "system"},
    {"MALLOC_MMAP_THRESHOLD_": "65536"},
    {"MALLOC_TRIM_THRESHOLD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
])
def test_a_user_setting_or_the_opt_out_leaves_malloc_alone(environ):
    assert allocator.tune_cpu_allocator(environ) is False


def test_off_linux_nothing_is_set(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.tune_cpu_allocator({}) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_on_glibc_the_thresholds_are_set():
    # in a child: the setting is process-wide
    code = "from iefcli.allocator import tune_cpu_allocator as t; print(t({}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import ctypes

    glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert out == [str(glibc)]


def test_the_cli_applies_it_once_per_command(monkeypatch):
    from typer.testing import CliRunner

    from iefcli.cli import app

    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda environ=None: calls.append(environ) or True)
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    assert calls == [None]
