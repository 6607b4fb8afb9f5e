"""Unpack one top-level folder of a dataset tarball, safely and atomically.

Members are checked before anything is written (no absolute paths, no ``..``, no links or device
files), so a crafted archive cannot write outside the folder. The folder is unpacked under a
temporary name beside its final place and renamed once complete, so an interrupted run leaves no
half-unpacked dataset behind that a later load would take for the real one.
"""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

__all__ = ["extract_folder"]


def extract_folder(archive: Path, top: str, *, call: str) -> Path:
    """Unpack the ``top/`` folder of the tarball ``archive`` into ``archive.parent / top``.

    Other members (e.g. CUB's ``attributes.txt`` beside its folder) are skipped.

    Raises:
        ValueError: the archive is not a readable tarball, has no ``top/`` folder, or holds a
            link or a path outside it. FileExistsError: ``archive.parent / top`` already exists.
    """
    target = archive.parent / top
    if target.exists():
        raise FileExistsError(
            f"{call}: {target} exists but lacks files the loader needs; delete it to unpack "
            f"{archive.name} again."
        )
    tmp = archive.parent / f".{top}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                parts = PurePosixPath(member.name).parts
                if not parts or parts[0] != top:
                    continue
                if ".." in parts or not (member.isfile() or member.isdir()):
                    raise ValueError(
                        f"{call}: {archive} holds {member.name!r}, a link or a path outside "
                        f"{top}/; it is not the official archive. Delete it and download it again."
                    )
                members.append(member)
            if not members:
                raise ValueError(
                    f"{call}: {archive} has no {top}/ folder; it is not the official archive. "
                    "Delete it and download it again."
                )
            if hasattr(tarfile, "data_filter"):  # Python's own checks too (3.10.12+, 3.11.4+)
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
        os.replace(tmp / top, target)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(
            f"{call}: cannot unpack {archive} ({type(err).__name__}: {err}); the file is corrupt "
            "or truncated. Delete it and download it again."
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
