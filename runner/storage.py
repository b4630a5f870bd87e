"""Storage stage: where input PDFs come from and where outputs go.

A small interface with two implementations: the local filesystem (here) and S3 via boto3
(``runner/storage_s3.py``). Paths handed to a storage are relative to its root, with ``/``
separators. Every write is atomic: a reader sees the old object or the new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class Storage(Protocol):
    root: str  # as given by the user (a folder or an s3:// URI)

    def list_files(self, suffixes: tuple[str, ...] = (".pdf",)) -> list[str]:
        """Relative paths of all files under the root with one of ``suffixes`` (case-insensitive),
        recursive, sorted."""

    def exists(self, rel: str) -> bool: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write (temporary object + rename locally; a single PUT or multipart upload on S3)."""

    def delete(self, rel: str) -> None: ...

    def local_path(self, rel: str) -> contextlib.AbstractContextManager[str]:
        """A local file path holding the object for the duration of the context."""

    def uri(self, rel: str) -> str:
        """A printable location of ``rel`` (never contains credentials)."""

    def cleanup_partial(self, rel_stem: str, suffixes: tuple[str, ...]) -> int:
        """Remove temporary files an interrupted writer left for ``rel_stem`` + one of ``suffixes``."""


TMP_MARK = ".tmp-"


class LocalStorage:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(root)
        self._root = Path(root)

    def _p(self, rel: str) -> Path:
        p = (self._root / rel).resolve()
        base = self._root.resolve()
        if p != base and base not in p.parents:
            raise ValueError(f"path {rel!r} escapes the storage root")
        return p

    def list_files(self, suffixes: tuple[str, ...] = (".pdf",)) -> list[str]:
        out = []
        if not self._root.is_dir():
            return []
        for dirpath, dirnames, filenames in os.walk(self._root):
            dirnames.sort()
            for fn in filenames:
                if fn.lower().endswith(tuple(s.lower() for s in suffixes)):
                    out.append(Path(dirpath, fn).relative_to(self._root).as_posix())
        return sorted(out)

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self._p(rel), data)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._p(rel).unlink()

    @contextlib.contextmanager
    def local_path(self, rel: str) -> Iterator[str]:
        yield str(self._p(rel))

    def uri(self, rel: str) -> str:
        return str(self._root / rel)

    def cleanup_partial(self, rel_stem: str, suffixes: tuple[str, ...]) -> int:
        target = self._p(rel_stem)
        folder, stem = target.parent, target.name
        prefixes = tuple(f".{stem}{suf}{TMP_MARK}" for suf in suffixes)
        n = 0
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name.startswith(prefixes):
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
                        n += 1
        return n


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: setting the umask to read it is process-wide and not thread-safe.
_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK


def open_storage(root: str) -> Storage:
    """Storage for a folder or an ``s3://bucket/prefix`` URI."""
    if root.startswith("s3://"):
        from runner.storage_s3 import S3Storage

        return S3Storage(root)
    return LocalStorage(root)
