"""Canonical rows: what every pool row becomes, whatever its file format or schema.

A canonical row is `id, instruction, input, output, source, origin, order` plus, for a row that
cannot be used, `reason` (why) and `raw` (the offending record, shortened). The id is a content
hash of the normalised instruction and input, so it is the same across runs, machines and file
formats; two rows with the same id are duplicates.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import pyarrow as pa

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("order", pa.int64()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)
ROW_BITS = 40  # order = file_index << ROW_BITS | row_number: file order first, then row order
RAW_KEEP = 500
_WS = re.compile(r"\s+")
_SURROGATE = re.compile(r"[\udc80-\udcff]")  # what surrogateescape leaves for undecodable bytes

USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "chatgpt", "bot", "model"}


def normalize_text(text: str) -> str:
    """The text two rows must share to count as the same instruction (NFKC, case, spacing)."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def row_id(instruction: str, input_text: str = "") -> str:
    key = normalize_text(instruction) + "\n\x00" + normalize_text(input_text or "")
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:24]


# What spreadsheets and pandas write for a missing value: never an instruction.
MISSING_WORDS = {"nan", "none", "null", "n/a", "na", "#n/a"}


class BadRow(ValueError):
    """A row that goes to the quarantine; the message is the reason and names the field."""


def _string(record: dict[str, Any], field: str | None, *, required: bool) -> str | None:
    if field is None:
        return None
    if field not in record or record[field] is None:
        if required:
            raise BadRow(f"missing field '{field}'")
        return None
    value = record[field]
    if not isinstance(value, str):
        raise BadRow(f"field '{field}' is {type(value).__name__}, expected a string")
    if _SURROGATE.search(value):
        raise BadRow(f"field '{field}' holds undecodable text (invalid UTF-8)")
    return value


def _from_turns(turns: Any, field: str, role_key: str, text_key: str) -> tuple[str, str | None]:
    if not isinstance(turns, list):
        raise BadRow(f"field '{field}' is {type(turns).__name__}, expected a list of turns")
    instruction = output = None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"field '{field}[{i}]' is {type(turn).__name__}, expected an object")
        role = str(turn.get(role_key, "")).lower()
        if instruction is None and role in USER_ROLES:
            instruction = _string(turn, text_key, required=True)
            instruction_field = f"{field}[{i}].{text_key}"
        elif instruction is not None and role in ASSISTANT_ROLES:
            output = _string(turn, text_key, required=False)
            break
    if instruction is None:
        raise BadRow(f"field '{field}' has no user turn")
    if not instruction.strip():
        raise BadRow(f"field '{instruction_field}' is empty")
    return instruction, output


def canonicalize(
    record: Any,
    *,
    schema: str,
    columns: dict[str, str | None],
    max_chars: int,
) -> tuple[str, str, str | None]:
    """(instruction, input, output) of one record, or BadRow with the reason."""
    if not isinstance(record, dict):
        raise BadRow(f"record is {type(record).__name__}, expected an object")
    if schema == "auto":
        schema = (
            "messages"
            if "messages" in record
            else "sharegpt"
            if "conversations" in record
            else "columns"
        )
    if schema == "messages":
        instruction, output = _from_turns(record.get("messages"), "messages", "role", "content")
        input_text = ""
    elif schema == "sharegpt":
        instruction, output = _from_turns(
            record.get("conversations"), "conversations", "from", "value"
        )
        input_text = ""
    else:  # alpaca or an explicit column mapping
        if schema == "alpaca":
            columns = {"instruction": "instruction", "input": "input", "output": "output"}
        field = columns["instruction"]
        instruction = _string(record, field, required=True)
        if not instruction.strip():
            raise BadRow(f"field '{field}' is empty")
        if instruction.strip().casefold() in MISSING_WORDS:
            raise BadRow(
                f"field '{field}' is {instruction.strip()!r}, a missing value written as text"
            )
        input_text = _string(record, columns.get("input"), required=False) or ""
        output = _string(record, columns.get("output"), required=False)
    size = len(instruction) + len(input_text)
    if size > max_chars:
        raise BadRow(f"instruction + input is {size} characters, over pool.max_chars ({max_chars})")
    return instruction, input_text, output


class BlockBuilder:
    """Collects canonical rows (good and bad) and hands them out as Arrow tables of SCHEMA."""

    def __init__(
        self,
        *,
        schema: str,
        columns: dict[str, str | None],
        max_chars: int,
        file_index: int,
        label: str,
    ):
        self.schema, self.columns, self.max_chars = schema, columns, max_chars
        self.file_index, self.label = file_index, label
        self.cols: dict[str, list] = {name: [] for name in SCHEMA.names}

    def __len__(self) -> int:
        return len(self.cols["id"])

    def add(self, row_number: int, record: Any) -> None:
        try:
            instruction, input_text, output = canonicalize(
                record, schema=self.schema, columns=self.columns, max_chars=self.max_chars
            )
        except BadRow as exc:
            self.add_bad(row_number, str(exc), record)
            return
        self._append(
            row_id(instruction, input_text), instruction, input_text, output, row_number, None, None
        )

    def add_bad(self, row_number: int, reason: str, raw: Any) -> None:
        text = raw if isinstance(raw, str) else repr(raw)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")[:RAW_KEEP]
        self._append(None, None, None, None, row_number, reason, text)

    def _append(self, id_, instruction, input_text, output, row_number, reason, raw) -> None:
        c = self.cols
        c["id"].append(id_)
        c["instruction"].append(instruction)
        c["input"].append(input_text)
        c["output"].append(output)
        c["source"].append("seed")
        c["origin"].append(f"{self.label}:{row_number}")
        c["order"].append((self.file_index << ROW_BITS) | row_number)
        c["reason"].append(reason)
        c["raw"].append(raw)

    def flush(self) -> pa.Table:
        table = pa.Table.from_pydict(self.cols, schema=SCHEMA)
        self.cols = {name: [] for name in SCHEMA.names}
        return table
