"""Writing output files atomically: a temporary file in the same folder, then a rename.

A kill at any moment leaves either the old file or the new one, never a broken one. A SIGKILL
during a write can leave the temporary file (.NAME.XXXXXXXX.tmp) behind; the next run in the
folder removes it (remove_stale_temporaries). While a write is under way its temporary file is
locked (flock), so a run starting in the same folder never removes a file still being written.
"""
import csv
import errno
import fcntl
import functools
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from lib.errors import UserError

# atomic_write's temporary names: "." + the file's name + "." + mkstemp's 8 random characters + ".tmp"
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# The file system refusing to grow a file: a full disk, a quota, a file size limit, read-only.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a kill leaves the old file or the new one.
    An OSError (a full disk, a quota, no permission) is a UserError naming `path`, and leaves the
    old file whole."""
    path = Path(path)
    try:
        _replace_atomically(path, write)
    except OSError as error:
        raise UserError(write_failure(path, error)) from None


def write_failure(path, error):
    """One line for an OSError while atomic_write wrote `path`."""
    return f"cannot write {path}: {failure_reason(error)}; any earlier {Path(path).name} is left as it was"


def failure_reason(error):
    """An OSError's reason in words and, for a full disk or quota, what to do."""
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL and error.errno != errno.EROFS:
        reason += " (free some space, or write elsewhere)"
    return reason


def _replace_atomically(path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # The lock lives as long as this process holds fd: a killed writer releases it.
        fcntl.flock(fd, fcntl.LOCK_EX)
        write(tmp)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def cache_folder():
    """This toolkit's cache folder: $XDG_CACHE_HOME/landmark-classification, or
    ~/.cache/landmark-classification without XDG_CACHE_HOME. Where there is no home folder either
    (a container run as a user id without a passwd entry and without HOME), a folder of this
    user's in the temporary folder, with a warning. Computed when first needed, never at import.
    Raises UserError when that temporary folder belongs to another user."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "landmark-classification"
    try:
        return Path.home() / ".cache" / "landmark-classification"
    except RuntimeError:  # Path.home(): neither HOME nor a passwd entry
        return _private_temporary_cache()


@functools.cache  # one warning per process
def _private_temporary_cache():
    folder = Path(tempfile.gettempdir()) / f"landmark-classification-cache-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise UserError(f"{folder}: the cache folder of a user without a home folder belongs to another user; "
                        "set XDG_CACHE_HOME (or HOME) to a folder of yours")
    print(f"warning: no home folder (HOME unset, no passwd entry for user id {os.getuid()}) and no "
          f"XDG_CACHE_HOME: caching in {folder}", file=sys.stderr)
    return folder


def remove_stale_temporaries(folder):
    """Delete atomic_write's temporary files in `folder` that no live process is writing
    (left by a kill during a write); returns their names."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if not TEMPORARY.fullmatch(path.name) or not path.is_file() or path.is_symlink():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: a write in progress
        else:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        finally:
            os.close(fd)
    return removed


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(data, path):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def write_csv(rows, path, fieldnames=None):
    """A list of dicts as CSV; the columns are the first row's keys unless given."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
