"""LongBench records: JSONL files of the official schema, checked line by line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

_REQUIRED_FIELDS = ("input", "context", "answers")


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` as a record of the LongBench schema, or a ValueError naming ``where`` and the
    field at fault.

    Parameters
    ----------
    record : Any
        One decoded record.
    where : str
        Where it comes from, e.g. ``"line 3 of data/qasper.jsonl"``.

    Returns
    -------
    dict
        The record itself.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"{where} holds a JSON {json_type(record)}, not an object; every line must be an "
            f"object with the fields {list(_REQUIRED_FIELDS)}."
        )
    for name in _REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(
                f"{where} lacks the field {name!r}; every line needs {list(_REQUIRED_FIELDS)}."
            )
    expected = {
        "input": (str, type(None)),
        "context": (str,),
        "answers": (list,),
        "all_classes": (list, type(None)),
        "_id": (str, int),
    }
    for name, types in expected.items():
        value = record.get(name)
        if name not in record or isinstance(value, types) and not isinstance(value, bool):
            continue
        wanted = " or ".join(
            {str: "a string", list: "a list of strings", int: "a number", type(None): "null"}[t]
            for t in types
        )
        raise ValueError(
            f"{where}: field {name!r} holds {json.dumps(value)[:40]}, not {wanted}; fix that line."
        )
    if not record["answers"]:
        raise ValueError(f"{where}: field 'answers' is empty; give at least one reference answer.")
    for name in ("answers", "all_classes"):
        if any(not isinstance(item, str) for item in record.get(name) or []):
            raise ValueError(
                f"{where}: field {name!r} must be a list of strings, got "
                f"{json.dumps(record[name])[:60]}; fix that line."
            )
    return record


def read_jsonl(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file in the LongBench schema, each checked by :func:`check_record`.

    Parameters
    ----------
    path : Path
        The file.
    limit : int or None
        Read at most this many records.

    Yields
    ------
    dict
        One record per non-empty line.

    Raises
    ------
    ValueError
        Naming the file, the line number and the field, if a line is not a JSON object, lacks
        ``input``, ``context`` or ``answers``, or holds a field of the wrong type.
    """
    with path.open("rb") as handle:
        lines = ((number, line) for number, line in enumerate(handle, start=1) if line.strip())
        for number, line in islice(lines, limit):
            where = f"line {number} of {path}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{where} is not UTF-8 text; save the file as UTF-8.") from None
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where} is not valid JSON ({error.msg} at column {error.colno}); fix or "
                    "delete that line."
                ) from None
            yield check_record(record, where)


def check_jsonl(path: Path, limit: int | None = None) -> None:
    """Read every record :func:`read_jsonl` would yield, so a bad line is refused before any
    model loads."""
    for _ in read_jsonl(path, limit):
        pass
