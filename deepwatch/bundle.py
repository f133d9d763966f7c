"""The model bundle: a directory with a manifest, JSON featurizer, safetensors weights and ONNX.

Loading a bundle executes nothing from it: JSON and safetensors only, each file checked against
the sha256 the manifest records. A bundle that does not match its manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BundleError, OutputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURIZER = "featurizer.json"
WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bundle_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of the bundle in ``directory`` where it is one :func:`save_bundle` writes
    (a format version, the deepwatch version, the model kind, every file's checksum); else None.
    Any other ``manifest.json`` (another tool's, a damaged one) does not make a bundle."""
    path = directory / MANIFEST
    if not path.is_file():  # (a FIFO would block the read)
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict):
        return None
    files = manifest.get("files")
    if not (isinstance(manifest.get("format_version"), int)
            and isinstance(manifest.get("deepwatch_version"), str)
            and isinstance(manifest.get("model_kind"), str)
            and isinstance(files, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        return None
    return manifest


def check_bundle_target(out: str | Path, make_parents: bool = False) -> Path:
    """Refuse, before any training, a place a bundle cannot be saved to; the directory a bundle
    goes to (the path resolved: ``.`` is the current directory) where it can.

    A bundle goes where nothing is, into an empty directory, or in place of a deepwatch bundle
    holding nothing but its own files. A file, a directory holding anything else (which saving
    would delete) or one that cannot be written is refused. Missing parent directories are
    made only with ``make_parents`` (when saving): the check before training leaves nothing
    behind, so a run that then fails or is stopped leaves no empty directories.
    """
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {out} is a file; a bundle is a directory")
    try:
        held = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    except OSError as exc:
        raise OutputError(f"cannot read the directory {out}: {exc.strerror or exc}") from None
    if held:
        manifest = _bundle_manifest(target) if MANIFEST in held else None
        if manifest is None:
            raise OutputError(f"{out} exists and is not a deepwatch bundle; refusing to "
                              "overwrite it")
        foreign = [name for name in held if name != MANIFEST and name not in manifest["files"]]
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise OutputError(f"{out} holds files that are not part of its bundle "
                              f"({', '.join(foreign[:3])}{more}); refusing to replace it")
    # an empty directory is written in place (it may be the current directory or a mount
    # point); anything else is made beside the target and moved into place
    probe_in = target if target.is_dir() and not held else target.parent
    # where parents are missing, the nearest one there is must be a directory (a file on the
    # way, file.txt/sub, was 'File exists') and is the one written to (probed) to make them
    present = probe_in
    while not os.path.lexists(present) and present != present.parent:
        present = present.parent
    if not present.is_dir():
        raise OutputError(f"cannot write a bundle at {out}: {present} is not a directory")
    try:  # a real write, not a permission bit: read-only mounts and odd file systems count
        if make_parents:
            probe_in.mkdir(parents=True, exist_ok=True)
            present = probe_in
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe.", dir=present))
    except OSError as exc:
        raise OutputError(f"cannot write a bundle at {out}: {exc.strerror or exc}") from None
    return target


def save_bundle(out: str | Path, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    """Write ``files`` and a manifest recording their checksums into the directory ``out``.

    The bundle is assembled beside ``out`` and moved into place, so a crash never leaves a
    half-written bundle where a good one was. Into an empty directory the files are moved one
    by one, the manifest last: until it is there, the directory is no bundle.
    """
    target = check_bundle_target(out, make_parents=True)
    try:
        return _save(target, manifest, files)
    except OSError as exc:  # a full disk, a directory removed under us
        raise OutputError(f"cannot write the bundle at {out}: {exc.strerror or exc}") from None


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def _save(out: Path, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    in_place = out.is_dir() and not any(out.iterdir())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out if in_place else out.parent))
    try:
        # mkdtemp makes a private (0700) directory; a bundle gets the mode a plain mkdir would
        # give (a service account may need to read what an analyst trained), or, replacing
        # a bundle, the mode that one had
        mode = (out.stat().st_mode & 0o7777 if out.is_dir() and not in_place
                else 0o777 & ~_umask())
        os.chmod(tmp, mode)
        checksums = {}
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            checksums[name] = hashlib.sha256(data).hexdigest()
        manifest = {
            "format_version": FORMAT_VERSION,
            "deepwatch_version": __version__,
            **manifest,
            "files": checksums,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if in_place:
            moved = []
            try:
                for name in [*files, MANIFEST]:
                    os.replace(tmp / name, out / name)
                    moved.append(name)
            except BaseException:  # (Ctrl-C too) the directory is left empty, as it was found
                for name in moved:
                    (out / name).unlink(missing_ok=True)
                raise
        elif out.exists():  # a bundle: swapped for the new one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old)  # onto the empty directory just made
            try:
                os.replace(tmp, out)
            except BaseException:  # Ctrl-C between the two moves too: the old bundle goes back
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


#: A manifest is a few kilobytes; one past this size is not one deepwatch wrote.
MAX_MANIFEST_BYTES = 16 << 20
#: The most a bundle file the loader reads may hold: protobuf's own ceiling for ``model.onnx``,
#: and far past any network deepwatch trains. Checked before reading, so a huge (or sparse)
#: file is refused at once instead of being read into memory to fail its checksum.
MAX_FILE_BYTES = 2 << 30
#: Files the loader reads from every bundle: each must be listed in the manifest's ``files``
#: (with ``model.onnx`` where the bundle has one), or it would escape its checksum.
REQUIRED_FILES = (FEATURIZER, WEIGHTS)
_SHA256_HEX = frozenset("0123456789abcdef")


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, where no key is given twice: json keeps the last silently, so
    a file listed twice in ``files`` would be checked against whichever checksum came last."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _RepeatedKey(key)
        obj[key] = value
    return obj


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's manifest, after checking every file against its recorded sha256.

    Every file the loader reads must be listed (``featurizer.json``, ``weights.safetensors``,
    and ``model.onnx`` where the bundle has one): a bundle with an unlisted one is refused, so
    deleting a file's entry cannot turn its checksum off. Only regular files are read: a FIFO,
    a device or a directory in a bundle is refused without being opened.
    """
    path = Path(path)
    try:
        path.stat()
        has_manifest = os.path.lexists(path / MANIFEST)
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"no bundle at {path}") from None
    except OSError as exc:  # a name too long, a folder not searchable, a loop of links
        raise BundleError(f"cannot look at a bundle at {path}: "
                          f"{exc.strerror or exc}") from None
    if not has_manifest:
        raise BundleError(f"{path} is not a deepwatch bundle (no {MANIFEST})")
    raw = _read_regular(path / MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_keys)
    except _RepeatedKey as exc:
        raise BundleError(f"{path / MANIFEST} gives {exc.args[0]!r} twice in one object (two "
                          "checksums for one file, say); it is not a manifest deepwatch "
                          "wrote") from None
    except UnicodeDecodeError:
        raise BundleError(f"{path / MANIFEST} is not UTF-8 text") from None
    except RecursionError:
        raise BundleError(f"{path / MANIFEST} is nested too deeply to be a deepwatch "
                          "manifest") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path / MANIFEST} is not valid JSON: {exc}") from None
    except ValueError:  # an integer of thousands of digits
        raise BundleError(f"{path / MANIFEST} holds a number too long to read; it is not a "
                          "deepwatch manifest") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise BundleError(f"{path / MANIFEST} is not a deepwatch manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version!r} is not supported (this deepwatch reads "
            f"version {FORMAT_VERSION}); retrain or use the deepwatch that wrote it"
        )
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{path / MANIFEST}: \"files\" must map each file name to its sha256")
    for name, expected in files.items():
        if (not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".")
                or name == MANIFEST):
            raise BundleError(f"manifest names a file outside the bundle: {name!r}")
        if not name.isprintable():
            # a line break or a terminal escape in a name went out raw in the messages that
            # name the file ('is missing', 'does not match'): a second line of the bundle's
            # own words after the error, or colours and cursor moves in the user's terminal
            raise BundleError(f"{path / MANIFEST} names a file with a control character in "
                              f"its name ({name!r}); it is not a manifest deepwatch wrote")
        if not (isinstance(expected, str) and len(expected) == 64
                and set(expected) <= _SHA256_HEX):
            raise BundleError(f"{path / MANIFEST}: the checksum of {name} is not a sha256")
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if ONNX not in files and os.path.lexists(path / ONNX):
        unlisted.append(ONNX)
    if unlisted:
        raise BundleError(
            f"bundle {path}: {', '.join(unlisted)} {'is' if len(unlisted) == 1 else 'are'} "
            "not listed in the manifest's files (no checksum to check against); refusing to "
            "load it")
    if verify:
        verify_files(path, manifest, files)
    return manifest


def verify_files(path: str | Path, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """Check the bundle files ``names`` against their checksums in ``manifest``."""
    for name in names:
        if _sha256_regular(Path(path) / name) != manifest["files"][name]:
            raise BundleError(_mismatch(Path(path), name))


def read_bundle_file(path: str | Path, manifest: dict[str, Any], name: str,
                     verify: bool = True) -> bytes:
    """The bytes of the bundle file ``name``, checked against the manifest (read_manifest's
    result) when ``verify``: the loader uses these very bytes, so the file checked is the one
    loaded. A file the manifest does not list is refused."""
    path = Path(path)
    expected = manifest["files"].get(name)
    if expected is None:
        raise BundleError(f"bundle {path}: {name} is not listed in the manifest's files; "
                          "refusing to load it")
    data = _read_regular(path / name, MAX_FILE_BYTES)
    if verify and hashlib.sha256(data).hexdigest() != expected:
        raise BundleError(_mismatch(path, name))
    return data


def _mismatch(path: Path, name: str) -> str:
    return (f"bundle {path}: {name} does not match its checksum in the manifest "
            "(modified or corrupted); refusing to load it")


def _open_regular(f: Path) -> int:
    """A descriptor of the regular file ``f``. Anything else (a FIFO, a device, a directory) is
    a BundleError and is not opened: checked before opening, and again on the descriptor
    (opened without blocking, so a FIFO swapped in between cannot hang the reader)."""
    try:
        mode = os.stat(f).st_mode
    except FileNotFoundError:
        raise BundleError(f"bundle {f.parent} is missing {f.name}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {f}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode):
        try:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise BundleError(f"cannot read {f}: {exc.strerror or exc}") from None
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
    raise BundleError(f"bundle {f.parent}: {f.name} is not a regular file; refusing to read it")


def _read_regular(f: Path, limit: int) -> bytes:
    fd = _open_regular(f)
    with os.fdopen(fd, "rb") as fh:
        try:  # the size first: nothing is read of a file too big (one that grows: limit + 1)
            too_big = os.fstat(fd).st_size > limit or len(data := fh.read(limit + 1)) > limit
        except OSError as exc:
            raise BundleError(f"cannot read {f}: {exc.strerror or exc}") from None
    if too_big:
        raise BundleError(f"{f} is over {limit:,} bytes; it is not part of a deepwatch bundle")
    return data


def _sha256_regular(f: Path) -> str:
    fd = _open_regular(f)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        try:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        except OSError as exc:
            raise BundleError(f"cannot read {f}: {exc.strerror or exc}") from None
    return h.hexdigest()
