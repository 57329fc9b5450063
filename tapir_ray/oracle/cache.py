"""The persistent response cache: one small JSON file per response under `<run>/oracle-cache/`.

Keyed by sha256 of (base_url, model, messages, sampling parameters). Every oracle actor on every
node reads and writes the same folder (local disk, NFS or an object store through fsspec); a file
is written atomically, so a reader sees a whole response or none. A hit makes no request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from tapir_ray import storage

CACHED_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "logprobs",
    "top_logprobs",
    "stop",
    "n",
)


def cache_key(base_url: str, model: str, messages: list[dict], params: dict[str, Any]) -> str:
    material = {
        "base_url": base_url,
        "model": model,
        "messages": messages,
        "params": {k: params[k] for k in CACHED_PARAMS if params.get(k) is not None},
    }
    constrained = (params.get("extra_body") or {}).get("structured_outputs")
    if constrained:  # a constrained reply differs from a free one
        material["structured_outputs"] = constrained
    return hashlib.sha256(
        json.dumps(material, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


class ResponseCache:
    def __init__(self, root: str):
        self.root = root

    def _path(self, key: str) -> str:
        return storage.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(storage.read_text(path))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # unreadable entry: ask again rather than fail the row

    def put(self, key: str, value: dict[str, Any]) -> None:
        storage.write_text_atomic(self._path(key), json.dumps(value, ensure_ascii=False))

    def total_usd(self) -> float:
        """What every cached reply cost: the spend a ledger can be rebuilt from."""
        fs, path = storage.fs_and_path(self.root)
        if not fs.exists(path):
            return 0.0
        total = 0.0
        for f in fs.glob(f"{path}/*/*.json"):
            with contextlib.suppress(OSError, ValueError), fs.open(f, "r") as fh:
                total += float(json.load(fh).get("usd") or 0.0)
        return total
