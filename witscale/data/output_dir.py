"""Writing a directory output (an HF export, a packed dataset) without ever losing what is at its path.

One place for the rules every witscale writer of a directory follows (docs/reliability.md#writers):
- A writer replaces only an earlier output of its own kind, recognized by its marker (an export's
  ``witscale_export.json``, a packed dataset's ``manifest.json`` with ``format_version``), or an empty
  directory; a regular file, or a non-empty directory of anything else, is refused in one line and never
  touched (:func:`check_target`). Symbolic links are followed: the output is written where the link points.
- The new output is written into a temporary sibling ``.<name>.<tag>-tmp-XXXXXX`` and swapped in at the end
  (``renameat2(RENAME_EXCHANGE)``: the path holds the old output, then the new one, never nothing; where the
  filesystem lacks it, the old one is renamed aside to ``.<name>.<tag>-old-XXXXXX`` first). The old output
  then sits at the temporary name and is removed. A crash at any point leaves the old or the new output
  complete at the path, plus at most such a leftover, which the next run of the same writer for the same path
  removes (a leftover still held by a live writer — an flock on the directory — is left alone; an old output
  renamed aside with nothing at the path is put back).
- Every OSError becomes :class:`OutputError`, one line naming the path and the errno
  (``/x/y: [Errno 28] No space left on device (writing tokens.bin; the previous output is untouched)``);
  the partial output is removed.
- Directories and files get the modes the umask gives (``tempfile`` would create them 0700/0600: unreadable
  to the rest of a team).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from typing import Callable, NamedTuple, Optional


class OutputError(ValueError):
    """A writer's refusal or OS failure, as one line that names the path."""


class OutputKind(NamedTuple):
    name: str                       # what the writer makes, in messages: 'HF export', 'packed dataset'
    tag: str                        # in the names of its temporary siblings: '.<name>.<tag>-tmp-…'
    marker: str                     # the file that says a directory is one (for messages)
    is_own: Callable[[str], bool]   # is this directory an earlier output of this kind?


# ------------------------------------------------------------------------------------------- small helpers
def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)          # not thread-safe, hence only the fallback
    os.umask(mask)
    return mask


def chmod_like_umask(path: str, directory: bool) -> None:
    """The mode open()/mkdir() would have given: 0o777/0o666 less the umask (tempfile's are 0700/0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def os_error_line(e: OSError, path: Optional[str] = None) -> str:
    """``path: [Errno N] message`` for an OSError (its own file name when it has one)."""
    where = e.filename if e.filename is not None else path
    what = f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
    return f"{where}: {what}" if where else what


def _same_or_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def path_relation(a: str, b: str) -> Optional[str]:
    """'equal', 'inside' (a inside b) or 'contains' (a contains b), symbolic links resolved; None when apart."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    if a == b:
        return "equal"
    if _same_or_inside(a, b):
        return "inside"
    if _same_or_inside(b, a):
        return "contains"
    return None


# ------------------------------------------------------------------------------------------- the target
def check_target(path: str, kind: OutputKind, overwrite: bool = True, flag: str = "--overwrite") -> str:
    """The real path to write ``path`` at, or OutputError when what is there must not be replaced: a file (or
    anything not a directory), a non-empty directory that is not an output of ``kind``, or any directory when
    ``overwrite`` is False. With ``overwrite`` an empty directory is replaced too (nothing is lost)."""
    real = os.path.realpath(path)
    try:
        if not os.path.lexists(real):
            return real
        if not os.path.isdir(real):
            raise OutputError(f"{path}: exists and is not a directory: refusing to replace it with a {kind.name}")
        empty = not os.listdir(real)
    except OSError as e:
        raise OutputError(os_error_line(e, path)) from None
    if not empty and not kind.is_own(real):
        raise OutputError(f"{path}: a non-empty directory that is not a {kind.name} (no {kind.marker}): refusing "
                          f"to replace it; choose another path, or empty or remove it yourself")
    if not overwrite:
        raise OutputError(f"{path}: output already exists; pass {flag} to replace it")
    return real


# ------------------------------------------------------------------------------------------- renames
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the paths a and b (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False                # a filesystem (NFS, some FUSE) without the flag: two renames instead
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _locked_elsewhere(path: str) -> bool:
    """Is a live writer holding this temporary directory (its flock)?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def clean_leftovers(out: str, kind: OutputKind) -> list[str]:
    """Remove this writer's leftovers of ``out`` (temporary and set-aside siblings of a crashed run; never a
    name of another pattern, never one a live writer holds); an old output set aside with nothing at ``out``
    is put back first. Returns what was removed."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    tmp_prefix, old_prefix = f".{base}.{kind.tag}-tmp-", f".{base}.{kind.tag}-old-"
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    removed = []
    for name in names:
        full = os.path.join(parent, name)
        if not (name.startswith(tmp_prefix) or name.startswith(old_prefix)) or os.path.islink(full) \
                or not os.path.isdir(full) or _locked_elsewhere(full):
            continue
        if name.startswith(old_prefix) and not os.path.lexists(out) and kind.is_own(full):
            os.rename(full, out)        # a crash between the two renames of the fallback: the old output back
            continue
        shutil.rmtree(full, ignore_errors=True)
        removed.append(full)
    return removed


# ------------------------------------------------------------------------------------------- the writer
class DirectoryWriter:
    """A directory output written aside and swapped in: ``tmp`` to fill, then ``commit()`` (or ``abort()``;
    leaving a ``with`` block by an exception aborts, an OSError becoming OutputError)."""

    def __init__(self, out: str, kind: OutputKind, overwrite: bool = True, flag: str = "--overwrite"):
        self.path, self.kind, self.overwrite, self.flag = out, kind, overwrite, flag
        self.out = check_target(out, kind, overwrite, flag)
        self._lock: Optional[int] = None
        self.tmp = ""
        parent = os.path.dirname(self.out)
        try:
            os.makedirs(parent, exist_ok=True)
            clean_leftovers(self.out, kind)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.{kind.tag}-tmp-", dir=parent)
            self._lock = os.open(self.tmp, os.O_RDONLY)
            fcntl.flock(self._lock, fcntl.LOCK_EX)       # clean_leftovers of a concurrent writer skips it
            chmod_like_umask(self.tmp, directory=True)
        except OSError as e:
            err = self.error(e)
            self.abort()
            raise err from None

    def error(self, e: OSError) -> OutputError:
        """The one line for an OSError met while writing: the output's path, the errno, the file."""
        name = e.filename if isinstance(e.filename, str) else None
        if self.tmp and name and _same_or_inside(name, self.tmp):
            inner = os.path.relpath(name, self.tmp)
            detail = f" (writing {inner}; the previous output is untouched)" if inner != "." else ""
        else:
            detail = f" ({name})" if name and name != self.path else ""
        what = f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
        return OutputError(f"{self.path}: {what}{detail}")

    def commit(self) -> None:
        """Swap the filled temporary directory in; the old output (if any) is removed afterwards."""
        aside = None
        try:
            check_target(self.path, self.kind, self.overwrite, self.flag)   # appeared while we wrote?
            _fsync_dir(self.tmp)
            if os.path.lexists(self.out):
                if not _exchange(self.tmp, self.out):
                    name = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.{self.kind.tag}-old-",
                                            dir=os.path.dirname(self.out))
                    os.rmdir(name)
                    os.rename(self.out, name)
                    aside = name
                    os.rename(self.tmp, self.out)
                    self.tmp, aside = aside, None
                old = self.tmp          # the old output, now at the temporary (or aside) name
            else:
                os.rename(self.tmp, self.out)
                old = None
            _fsync_dir(os.path.dirname(self.out))
        except BaseException as e:
            err = self.error(e) if isinstance(e, OSError) else None
            if aside and not os.path.lexists(self.out):
                os.rename(aside, self.out)      # the second rename failed: the old output back at once
            self.abort()
            if err is not None:
                raise err from None
            raise
        self._unlock()
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self.tmp = ""

    def _unlock(self) -> None:
        if self._lock is not None:
            try:
                os.close(self._lock)
            except OSError:
                pass
            self._lock = None

    def abort(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""
        self._unlock()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            err = self.error(exc) if isinstance(exc, OSError) else None
            self.abort()
            if err is not None:
                raise err from None
