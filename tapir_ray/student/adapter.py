"""LoRA adapters as the student stage sees them: an id, a folder, and a content hash."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tapir_ray import storage

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_sha256(folder: str) -> str:
    """sha256 over the adapter's config and weights (names and bytes), stable across copies."""
    digest = hashlib.sha256()
    fs, path = storage.fs_and_path(folder)
    for name in ADAPTER_FILES:
        full = f"{path}/{name}"
        if not fs.exists(full):
            raise FileNotFoundError(f"{folder}: not a PEFT adapter folder (no {name})")
        digest.update(name.encode() + b"\0")
        with fs.open(full, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Adapter:
    id: str  # e.g. "round-1"
    path: str
    sha256: str

    @classmethod
    def load(cls, adapter_id: str, path: str, expected_sha256: str | None = None) -> Adapter:
        sha = adapter_sha256(path)
        if expected_sha256 is not None and sha != expected_sha256:
            raise ValueError(
                f"adapter {adapter_id} at {path} has sha256 {sha[:12]}…, expected {expected_sha256[:12]}… (stale or modified)"
            )
        return cls(adapter_id, path, sha)
