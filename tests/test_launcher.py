"""gptx/launcher.py: the `gptx` command re-executes itself once with glibc's huge-page tunable, where it helps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptx import launcher
from gptx.launcher import OPT_OUT, TUNABLE, huge_page_environment

GLIBC, MADVISE = (2, 36), "madvise"


def test_the_tunable_is_added_where_it_helps():
    env = huge_page_environment({"PATH": "/bin"}, GLIBC, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    kept = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, MADVISE)
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"  # the user's tunables stay


@pytest.mark.parametrize("environ, glibc, mode", [
    ({OPT_OUT: "0"}, GLIBC, MADVISE),                 # opted out
    ({"GLIBC_TUNABLES": TUNABLE}, GLIBC, MADVISE),    # already on: never a second exec
    ({"GLIBC_TUNABLES": f"a=1:{TUNABLE}"}, GLIBC, MADVISE),
    ({}, (2, 34), MADVISE),                           # glibc without the tunable
    ({}, None, MADVISE),                              # not glibc (musl, macOS)
    ({}, GLIBC, "always"),                            # the kernel already backs big blocks with huge pages
    ({}, GLIBC, "never"),
    ({}, GLIBC, None),                                # no THP at all
])
def test_no_exec_where_it_would_change_nothing(environ, glibc, mode):
    assert huge_page_environment(environ, glibc, mode) is None


def test_active_reads_the_tunables_list():
    assert launcher.active({"GLIBC_TUNABLES": f"x=1:{TUNABLE}"})
    assert not launcher.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) and not launcher.active({})


def gptx_bench_tunables(export_dir: Path, tmp_path: Path, **env) -> str | None:
    """Run the installed `gptx` console script (a real process) and return the GLIBC_TUNABLES its bench saw."""
    script = Path(sys.executable).parent / "gptx"
    out = tmp_path / f"bench-{len(env)}.json"
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)} | env
    proc = subprocess.run([str(script), "bench", str(export_dir), "--prompt-len", "4", "--new-tokens", "3",
                           "--runs", "1", "--compare", "none", "--json", str(out)],
                          capture_output=True, text=True, env=environ, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())["machine"]["glibc_tunables"]


class Exec(Exception):
    """Raised in place of os.execve, carrying what it was given."""


def test_reexec_runs_the_same_command_under_the_tunable(monkeypatch):
    def execve(path, argv, env):
        raise Exec(path, argv, env)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "/venv/bin/gptx", "bench", "x"], raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(launcher, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(launcher, "thp_mode", lambda: "madvise")
    monkeypatch.delenv(OPT_OUT, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    with pytest.raises(Exec) as e:
        launcher.reexec_with_huge_pages()
    path, argv, env = e.value.args
    assert path == sys.executable and argv == [sys.executable, "/venv/bin/gptx", "bench", "x"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"

    monkeypatch.setattr(launcher, "thp_mode", lambda: "always")  # nothing to gain: no exec, the call returns
    assert launcher.reexec_with_huge_pages() is None


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                        ("garbled", None), (None, None)])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, monkeypatch, text, mode):
    path = tmp_path / "enabled"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(launcher, "THP_ENABLED", path)
    assert launcher.thp_mode() == mode


def machine_takes_huge_pages() -> bool:
    """glibc >= 2.35 and the kernel's THP mode "madvise", read here rather than through the launcher."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except (AttributeError, ValueError, OSError):
        return False
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35) and "[madvise]" in thp


def test_gptx_runs_with_huge_pages_unless_opted_out(export_dir, tmp_path):
    assert gptx_bench_tunables(export_dir, tmp_path, **{OPT_OUT: "0"}) is None
    if not machine_takes_huge_pages():
        pytest.skip("this machine has no glibc >= 2.35 with THP in madvise mode: the command runs as it is")
    assert gptx_bench_tunables(export_dir, tmp_path) == TUNABLE
