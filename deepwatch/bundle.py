"""The model bundle: a directory with a manifest, JSON featurizer, safetensors weights and ONNX.

Loading a bundle executes nothing from it: JSON and safetensors only, each file checked against
the sha256 the manifest records. A bundle that does not match its manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


def check_bundle_target(out: str | Path) -> None:
    """Refuse, before any training, a place a bundle cannot be saved to: a file, or a directory
    that holds something other than a bundle (it would be replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; a bundle is a directory")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not a deepwatch bundle; refusing to overwrite it")
    try:  # a real write, not a permission bit: read-only mounts and odd file systems count
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write a bundle at {out}: {exc.strerror or exc}") from None


def save_bundle(out: str | Path, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    """Write ``files`` and a manifest recording their checksums into the directory ``out``.

    The bundle is assembled beside ``out`` and moved into place, so a crash never leaves a
    half-written bundle where a good one was.
    """
    out = Path(out)
    check_bundle_target(out)
    try:
        return _save(out, manifest, files)
    except OSError as exc:  # a full disk, a directory removed under us
        raise OutputError(f"cannot write the bundle at {out}: {exc.strerror or exc}") from None


def _save(out: Path, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
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
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's manifest, after checking every file against its recorded sha256."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"no bundle at {path}")
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a deepwatch bundle (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path / MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise BundleError(f"{path / MANIFEST} is not a deepwatch manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version!r} is not supported (this deepwatch reads "
            f"version {FORMAT_VERSION}); retrain or use the deepwatch that wrote it"
        )
    if verify:
        for name, expected in manifest["files"].items():
            if "/" in name or name.startswith("."):
                raise BundleError(f"manifest names a file outside the bundle: {name!r}")
            f = path / name
            if not f.is_file():
                raise BundleError(f"bundle {path} is missing {name}")
            if sha256_file(f) != expected:
                raise BundleError(
                    f"bundle {path}: {name} does not match its checksum in the manifest "
                    "(modified or corrupted); refusing to load it"
                )
    return manifest
