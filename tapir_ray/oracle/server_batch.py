"""The Files and Batches endpoints of `tapir-ray oracle serve`, as OpenAI's Batch API has them.

`POST /v1/files` (multipart, purpose=batch), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
`DELETE /v1/files/{id}`; `POST /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`,
`GET /v1/batches` (newest first, `limit` and `after`). Each line of an input file is answered by the
server's own backend (scripted or local model) exactly as a chat request would be, so a batch's
outputs equal the online ones; lines that fail go to the error file with their status, as the
provider's do.

A provider takes hours; here a batch's processing time and completion window are simulated:
`processing_s` spreads the lines over that many seconds, and `window_s` is what "24h" means, so
a test can let a batch expire half done (its completed lines are in the output file, the rest in
the error file as `batch_expired`). Everything lives in memory for the server's lifetime.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

ENDPOINT = "/v1/chat/completions"
CHUNK = 64  # lines answered together (a local model batches them)


def _now() -> int:
    return int(time.time())


class BatchFront:
    """`server` is the OracleServer whose backend answers the lines (its `_complete`, `_error` and
    `_authorized`); not imported here, so that this module stays below server.py."""

    def __init__(self, server: Any, *, processing_s: float = 0.0, window_s: float = 86_400.0):
        self.server = server
        self.processing_s = processing_s
        self.window_s = window_s
        self.files: dict[str, dict[str, Any]] = {}
        self.data: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.stats = {"files": 0, "batches": 0, "batch_lines": 0}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{id}", self.file)
        app.router.add_delete("/v1/files/{id}", self.delete_file)
        app.router.add_get("/v1/files/{id}/content", self.content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{id}", self.get)
        app.router.add_post("/v1/batches/{id}/cancel", self.cancel)

    # -- files --

    def _denied(self, request: web.Request) -> web.Response | None:
        if not self.server._authorized(request):
            return self.server._error(401, "invalid API key")
        return None

    def _store(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        fid = f"file-{uuid.uuid4().hex[:24]}"
        meta = {"id": fid, "object": "file", "bytes": len(data), "created_at": _now(),
                "filename": filename, "purpose": purpose, "status": "processed"}  # fmt: skip
        self.files[fid], self.data[fid] = meta, data
        self.stats["files"] += 1
        return meta

    async def upload(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        form = await request.post()
        field = form.get("file")
        if field is None or not hasattr(field, "file"):
            return self.server._error(400, "a multipart field 'file' is required")
        if form.get("purpose") != "batch":
            return self.server._error(400, "purpose must be 'batch'")
        meta = self._store(field.file.read(), field.filename or "input.jsonl", "batch")
        return web.json_response(meta)

    def _file_or_404(self, request: web.Request) -> tuple[str, web.Response | None]:
        fid = request.match_info["id"]
        if fid not in self.files:
            return fid, self.server._error(404, f"no file {fid}")
        return fid, None

    async def file(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        fid, missing = self._file_or_404(request)
        return missing or web.json_response(self.files[fid])

    async def content(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        fid, missing = self._file_or_404(request)
        return missing or web.Response(body=self.data[fid], content_type="application/jsonl")

    async def delete_file(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        fid, missing = self._file_or_404(request)
        if missing:
            return missing
        del self.files[fid], self.data[fid]
        return web.json_response({"id": fid, "object": "file", "deleted": True})

    # -- batches --

    async def create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        fid = body.get("input_file_id")
        if fid not in self.files:
            return self.server._error(400, f"input_file_id {fid!r} is not a file of this server")
        if body.get("endpoint") != ENDPOINT:
            return self.server._error(400, f"endpoint must be {ENDPOINT}")
        created = _now()
        bid = f"batch_{uuid.uuid4().hex[:24]}"
        batch = {
            "id": bid, "object": "batch", "endpoint": ENDPOINT, "errors": None,
            "input_file_id": fid, "completion_window": body.get("completion_window", "24h"),
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": created, "in_progress_at": None, "expires_at": created + int(self.window_s),
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }  # fmt: skip
        self.batches[bid] = batch
        self.stats["batches"] += 1
        auth = request.headers.get("Authorization", "")
        self.tasks[bid] = asyncio.get_running_loop().create_task(self._process(bid, auth))
        return web.json_response(batch)

    async def get(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        bid = request.match_info["id"]
        if bid not in self.batches:
            return self.server._error(404, f"no batch {bid}")
        return web.json_response(self.batches[bid])

    async def list_batches(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after")
        newest = list(reversed(self.batches.values()))
        if after is not None:
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        page = newest[:limit]
        return web.json_response({
            "object": "list", "data": page, "has_more": len(newest) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
        })  # fmt: skip

    async def cancel(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        bid = request.match_info["id"]
        batch = self.batches.get(bid)
        if batch is None:
            return self.server._error(404, f"no batch {bid}")
        if batch["status"] in ("validating", "in_progress"):
            batch["status"], batch["cancelling_at"] = "cancelling", _now()
        return web.json_response(batch)

    async def _process(self, bid: str, authorization: str) -> None:
        batch = self.batches[bid]
        started = time.monotonic()
        lines, problems = [], []
        for n, raw in enumerate(self.data[batch["input_file_id"]].decode().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                ok = line.get("method") == "POST" and line.get("url") == ENDPOINT
                ok = (
                    ok
                    and isinstance(line.get("custom_id"), str)
                    and isinstance(line.get("body"), dict)
                )
            except (json.JSONDecodeError, AttributeError):
                ok = False
            if not ok:
                problems.append({"code": "invalid_request", "line": n,
                                 "message": "each line needs custom_id, method POST, url and body"})  # fmt: skip
            else:
                lines.append(line)
        if problems or not lines or len({x["custom_id"] for x in lines}) < len(lines):
            problems = problems or [{"code": "invalid_request", "line": None,
                                     "message": "empty file or repeated custom_id"}]  # fmt: skip
            batch.update(
                status="failed", failed_at=_now(), errors={"object": "list", "data": problems[:20]}
            )
            return
        batch.update(status="in_progress", in_progress_at=_now())
        batch["request_counts"]["total"] = len(lines)
        out, err = [], []
        done = 0
        end = None
        for start in range(0, len(lines), CHUNK):
            if batch["status"] == "cancelling":
                end = "cancelled"
                break
            if time.monotonic() - started > self.window_s:
                end = "expired"
                break
            chunk = lines[start : start + CHUNK]
            replies = await asyncio.gather(
                *(self.server._complete(x["body"], authorization) for x in chunk)
            )
            for line, resp in zip(chunk, replies, strict=True):
                record = {"id": f"batch_req_{uuid.uuid4().hex[:20]}", "custom_id": line["custom_id"],
                          "response": {"status_code": resp.status, "request_id": uuid.uuid4().hex[:16],
                                       "body": json.loads(resp.body)}, "error": None}  # fmt: skip
                (out if resp.status == 200 else err).append(record)
                batch["request_counts"]["completed" if resp.status == 200 else "failed"] += 1
            done += len(chunk)
            self.stats["batch_lines"] += len(chunk)
            if self.processing_s:  # the provider's pace: all lines over processing_s
                await asyncio.sleep(
                    max(0.0, started + self.processing_s * done / len(lines) - time.monotonic())
                )
            else:
                await asyncio.sleep(0)
        code = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(end or "")
        for line in lines[done:]:
            err.append({"id": f"batch_req_{uuid.uuid4().hex[:20]}", "custom_id": line["custom_id"],
                        "response": None, "error": {"code": code, "message": f"This request was not executed: the batch was {end}."}})  # fmt: skip
            batch["request_counts"]["failed"] += 1
        batch.update(status="finalizing", finalizing_at=_now())
        if out:
            batch["output_file_id"] = self._file_of(out, f"{bid}_output.jsonl")
        if err:
            batch["error_file_id"] = self._file_of(err, f"{bid}_error.jsonl")
        final = end or "completed"
        batch.update(status=final, **{f"{final}_at": _now()})

    def _file_of(self, records: list[dict], name: str) -> str:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        return self._store(data, name, "batch_output")["id"]
