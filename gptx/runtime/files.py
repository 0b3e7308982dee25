"""Writing files so that nothing half-written is ever seen and nothing is left behind: one place for all of gptx.

Writers work beside their target under a name that carries their pid (`.NAME.tmp-PID`...) and rename into place;
the debris of a writer that died is removed by the next writer of the same target only once that pid is gone, so
a live writer's files are never touched. Pure standard library, no PyTorch: the runtime uses it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import GptxError

TMP, PARTIAL, OLD = "tmp", "partial", "old"
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|partial|old)-(?P<pid>\d+)(?:-(?P<token>[0-9a-f]+))?$")
# what a full or read-only disk looks like; EFBIG is what a file-size limit (ulimit -f) gives
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # linux/fcntl.h, linux/fs.h


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is a set-and-return)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain `mkdir`/`open` would have (onnx writes its
    external data file 0600, tempfile makes 0700 directories: a server running as another user could not read)."""
    mask = current_umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def make_dir(path: Path) -> Path:
    """mkdir with the umask's mode (tempfile.mkdtemp would give 0700)."""
    os.mkdir(path, 0o777)
    return path


def debris_path(target: Path, kind: str) -> Path:
    """A sibling of `target` that says which process owns it: `.NAME.KIND-PID[-TOKEN]`."""
    target, token = Path(target), "" if kind == TMP else f"-{secrets.token_hex(4)}"
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}{token}")


def debris_target(name: str) -> str | None:
    """The name of the file a piece of debris (`.NAME.tmp-PID`...) belongs to, or None if `name` is not debris."""
    m = _DEBRIS.match(name)
    return m["name"] if m else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True


def remove_tree(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(target: Path) -> list[Path]:
    """Remove debris (`.NAME.tmp|partial|old-PID...`) of `target` left by processes that are no longer running
    (a dead writer whose pid another process reuses is left alone: the safe side)."""
    target = Path(target)
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    removed = [path for path in siblings if (m := _DEBRIS.match(path.name)) and m["name"] == target.name
               and (m["kind"] == TMP or m["token"]) and not pid_alive(int(m["pid"]))]
    for path in removed:
        remove_tree(path)
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        print(f"gptx: removed {len(removed)} leftover(s) of an interrupted run beside {target}: {names}",
              file=sys.stderr, flush=True)
    return removed


def resolve_inside(root: Path, rel) -> Path | None:
    """`root/rel` with symlinks resolved, or None when it is not a usable path strictly inside `root`
    (absolute, `..` or a symlink out, NUL bytes, symlink loops, names too long). For paths read from files."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel):
        return None
    try:
        base = Path(root).resolve()
        path = (Path(root) / rel).resolve()
        path.exists()  # raises for names the OS refuses (too long...)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (pathlib, Python < 3.13)
        return None
    return path if path != base and path.is_relative_to(base) else None


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem/OS lets a directory be fsync'd
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (for writers that want a path: torch.save, onnx.save); when the
    block succeeds it replaces `target` in one rename. On any failure the temporary file is removed and `target`
    is untouched; disk-full and permission errors become one-line GptxErrors."""
    target = Path(target)
    clean_stale(target)
    tmp = debris_path(target, TMP)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise GptxError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    fsync_dir(target.parent)


def check_writable_file(path: Path, option: str) -> Path:
    """Fail before any work if `path` cannot become a regular file we write (a directory, /dev/full...)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise GptxError(f"{option} {path} is a directory; give a file path")
    if path.exists() and not path.is_file():
        raise GptxError(f"{option} {path} is not a regular file")
    if not path.parent.is_dir():
        raise GptxError(f"{option} {path}: directory {path.parent} does not exist")
    return path


def atomic_write(target: str | Path, data: bytes | memoryview | str) -> Path:
    """Write text or any bytes-like object to `target` atomically (the umask decides its mode)."""
    with atomic_path(target) as tmp, open(tmp, "xb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(target)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS or filesystem can't."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory `new` at `target` (a sibling), replacing what is there, with renames only.

    Linux: one atomic exchange (renameat2), so a reader polling `target` always finds a complete directory.
    Elsewhere: the old one is renamed aside first (a reader may briefly find no `target`, never a mix).
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        remove_tree(new)
    else:
        old = debris_path(target, OLD)
        os.rename(target, old)
        os.rename(new, target)
        remove_tree(old)
    fsync_dir(target.parent)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
