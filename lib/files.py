"""Writing output files atomically: a temporary file in the same folder, then a rename.

A kill at any moment leaves either the old file or the new one, never a broken one.
"""
import csv
import io
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
