"""Which run made an output, and from which outputs: the fingerprint of a manifest and the
fingerprints of the manifests of its inputs (`upstream`).

Every manifest gets `fingerprint`, a hash of its content when written: a re-run writes a
new one (its `created` differs), so a stage that recorded its inputs' fingerprints can tell
that an input was made again since. `upstream` maps each input folder that is an output of
ours (a folder with a manifest.json, named by an option of the run) to its fingerprint.
`pipelines.run` compares them to decide what is up to date, as make compares file times.
Beam-free: the trainer writes its manifest with it too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from transforms.formats.files import is_url, read_json

FINGERPRINT = "fingerprint"
UPSTREAM = "upstream"
# Characters that start a glob: an input pattern's folder is the part before its first.
_GLOB = "*?["


def fingerprint_of(manifest: dict) -> str:
    """The fingerprint a manifest records, or for one written before fingerprints, the hash
    of its content (stable for the same file)."""
    recorded = manifest.get(FINGERPRINT)
    if isinstance(recorded, str) and recorded:
        return recorded
    return content_hash(manifest)


def content_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != FINGERPRINT}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:20]


def _exists(path: str) -> bool:
    if is_url(path):
        from apache_beam.io.filesystems import FileSystems

        try:
            return FileSystems.exists(path)
        except Exception:  # noqa: BLE001 - an unreachable store: nothing recorded
            return False
    import os

    return os.path.isfile(path)


def output_folder(value: str) -> Optional[str]:
    """The output folder of ours an option's value names (the folder itself, or a glob or a
    file inside it), or None."""
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 4096:
        return None
    path = value
    for i, ch in enumerate(path):
        if ch in _GLOB:
            path = path[:i]
            break
    path = path.rstrip("/")
    for candidate in (path, path.rsplit("/", 1)[0] if "/" in path else ""):
        if candidate and _exists(f"{candidate}/manifest.json"):
            return candidate
    return None


def upstream_of(options: dict, own_output: Optional[str] = None) -> dict[str, str]:
    """{input folder: its manifest's fingerprint} for every option value (a comma list is
    split) that names an output of ours other than this run's own."""
    found: dict[str, str] = {}
    own = (own_output or "").rstrip("/")
    for value in (options or {}).values():
        for part in (value.split(",") if isinstance(value, str) else []):
            folder = output_folder(part.strip())
            if folder and folder != own and folder not in found:
                try:
                    found[folder] = fingerprint_of(read_json(f"{folder}/manifest.json"))
                except (OSError, ValueError):
                    continue
    return dict(sorted(found.items()))


def stamp(manifest: dict, options: Optional[dict] = None, own_output: Optional[str] = None) -> dict:
    """`manifest` with `upstream` (from `options`, when given) and its `fingerprint`."""
    if options is not None:
        manifest[UPSTREAM] = upstream_of(options, own_output)
    manifest.pop(FINGERPRINT, None)
    manifest[FINGERPRINT] = content_hash(manifest)
    return manifest
