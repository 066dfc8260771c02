"""Dataset uploads: parse a CSV or NPZ file within limits, store its arrays by id, describe them in the database.

Nothing in an upload is ever executed: CSV cells go through float(), NPZ archives through numpy.load with
allow_pickle=False (so object arrays, which are pickles, are refused unread), and the arrays are stored as
safetensors. Every refusal is a 422 (413 for size) whose message names the problem and where it is.
"""

import csv
import hashlib
import io
import uuid
import zipfile
import zlib
from array import array
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
from safetensors.numpy import save
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from api.errors import InvalidRequest, NotFound, PayloadTooLarge
from api.services.pagination import decode_cursor, encode_cursor
from kiln.catalog import Task
from kiln.db import utcnow
from kiln.settings import get_settings
from kiln.storage import Store, is_id
from kiln.tables import Dataset

RequestedTask = Literal["auto", "classification", "binary", "regression"]

FORMAT = "kiln.dataset/1"
MIN_ROWS = 10
MAX_COLUMNS = 10_000  # features, plus the target column of a CSV
MAX_CLASSES = 1_000
AUTO_MAX_CLASSES = 50  # task "auto": integer targets with at most this many values are classes
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an NPZ archive is a zip file (the second: an empty one)
FORMATS = "upload a CSV file with a header row, or an NPZ archive (numpy.savez) with arrays x and y"


def _invalid(message: str, field: str = "body.file", **where: object) -> InvalidRequest:
    """A 422 whose message is one sentence; details name the form field and, for a cell, where it is."""
    return InvalidRequest(f"The upload is invalid: {message}.", details=[{"field": field, "message": message, **where}])


# --- reading --------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """Arrays as read, before any check of their values; and how to name a cell in a message."""

    x: np.ndarray  # (rows, features), numeric
    y: np.ndarray  # (rows,), numeric
    lines: np.ndarray | None = None  # CSV: the file line of each row
    columns: list[str] | None = None  # CSV: the feature columns' names
    target: str | None = None  # CSV: the target column's name

    def where(self, row: int, column: int | None) -> dict[str, object]:
        """column None: the target."""
        if self.lines is None:
            return {"array": "y", "index": [row]} if column is None else {"array": "x", "index": [row, column]}
        assert self.columns is not None
        return {"line": int(self.lines[row]), "column": self.target if column is None else self.columns[column]}

    def describe(self, row: int, column: int | None) -> str:
        place = self.where(row, column)
        if "line" in place:
            return f"line {place['line']}, column {place['column']!r}"
        return f"{place['array']}[{', '.join(map(str, place['index']))}]"


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(file: BinaryIO, target: str | None) -> _Table:
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        return _read_rows(reader, target)
    except UnicodeDecodeError as exc:
        raise _invalid(f"the file is neither an NPZ archive nor UTF-8 text ({exc.reason}); save a CSV file as "
                       f"UTF-8, or {FORMATS}") from None
    except csv.Error as exc:
        raise _invalid(f"line {reader.line_num} is not valid CSV ({exc})", line=reader.line_num) from None
    finally:
        text.detach()  # the upload's file is closed by its owner


def _read_rows(reader, target: str | None) -> _Table:
    header = next((row for row in reader if row), None)
    if header is None:
        raise _invalid(f"the file holds no rows; {FORMATS}")
    header = [name.strip() for name in header]
    line = reader.line_num
    if len(header) > MAX_COLUMNS:
        raise _invalid(f"the header has {len(header)} columns; at most {MAX_COLUMNS} are allowed", line=line)
    if all(_is_number(name) for name in header):
        raise _invalid(f"line {line} holds only numbers, not column names; add a header row naming the columns "
                       "first", line=line)
    seen: set[str] = set()
    for i, name in enumerate(header):
        if not name:
            raise _invalid(f"column {i + 1} of the header has no name; name every column", line=line)
        if name in seen:
            raise _invalid(f"column {name!r} appears twice in the header; give every column its own name", line=line)
        seen.add(name)
    if target is None or target not in header:
        shown = ", ".join(header[:20]) + (f" and {len(header) - 20} more" if len(header) > 20 else "")
        what = f"there is no column named {target!r}" if target else "a CSV upload needs target"
        raise _invalid(f"{what}; set target to the column that holds the labels or values to learn, one of: {shown}",
                       field="body.target")
    if len(header) < 2:
        raise _invalid(f"the file has only the target column {target!r}; add at least one feature column")

    t = header.index(target)
    columns = header[:t] + header[t + 1:]
    values, targets, lines = array("d"), array("d"), array("q")
    for row in reader:
        if not row:
            continue  # a blank line
        line = reader.line_num
        if len(row) != len(header):
            raise _invalid(f"line {line} has {len(row)} values, but the header names {len(header)} columns; give "
                           "every row one value per column", line=line)
        try:
            numbers = [float(cell) for cell in row]
        except ValueError:
            c = next(i for i, cell in enumerate(row) if not _is_number(cell))
            cell = row[c].strip()
            what = "is empty" if not cell else f"holds {cell[:40]!r}, which is not a number"
            raise _invalid(f"line {line}, column {header[c]!r} {what}; every cell must be a number", line=line,
                           column=header[c]) from None
        targets.append(numbers.pop(t))
        values.extend(numbers)
        lines.append(line)
    x = np.frombuffer(values, dtype=np.float64).reshape(len(targets), len(columns))
    return _Table(x, np.frombuffer(targets, dtype=np.float64), np.frombuffer(lines, dtype=np.int64), columns, target)


def _read_npz(file: BinaryIO, max_bytes: int) -> _Table:
    try:
        with np.load(file, allow_pickle=False) as archive:
            unpacked = sum(member.file_size for member in archive.zip.infolist())
            if unpacked > max_bytes:
                raise PayloadTooLarge(f"The arrays in the NPZ archive take {unpacked} bytes uncompressed; at most "
                                      f"{max_bytes} are allowed.")
            if missing := [key for key in ("x", "y") if key not in archive.files]:
                held = ", ".join(archive.files[:20]) or "none"
                raise _invalid(f"the NPZ archive has no array {' or '.join(missing)} (it holds: {held}); save it "
                               "with numpy.savez(path, x=features, y=targets)")
            x, y = _array(archive, "x"), _array(archive, "y")
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise _invalid(f"the file looks like an NPZ archive but cannot be read ({exc}); {FORMATS}") from None
    if x.ndim != 2:
        raise _invalid(f"x has shape {x.shape}; it must be 2-D, (rows, features)")
    if y.ndim != 1:
        raise _invalid(f"y has shape {y.shape}; it must be 1-D, one target per row of x (y.ravel() flattens it)")
    if len(x) != len(y):
        raise _invalid(f"x has {len(x)} rows but y has {len(y)} values; give one target per row")
    if x.shape[1] == 0:
        raise _invalid("x has no features; it must have at least one column")
    if x.shape[1] > MAX_COLUMNS:
        raise _invalid(f"x has {x.shape[1]} features; at most {MAX_COLUMNS} are allowed")
    return _Table(x, y)


def _array(archive, key: str) -> np.ndarray:
    try:
        value = archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # an object array: its bytes are a pickle, which kiln never loads
            raise _invalid(f"array {key} holds Python objects (a pickle), which kiln never loads; save plain "
                           "numeric arrays") from None
        raise
    if not isinstance(value, np.ndarray):
        raise _invalid(f"{key} in the archive is not a .npy array; save the arrays with numpy.savez")
    if value.dtype.kind not in "biuf":
        raise _invalid(f"array {key} holds {value.dtype} values; it must hold real numbers (integers or floats)")
    return value


# --- checking -------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    x: np.ndarray  # float32 (rows, features)
    y: np.ndarray  # int64 class indices 0..k-1, or float32 values
    task: Task
    classes: int | None
    labels: list[int] | None  # the original label of each class index


def _finite32(table: _Table, values: np.ndarray, column: int | None) -> np.ndarray:
    """values as float32; a 422 naming the first value that is not finite there (nan, inf, or beyond float32)."""
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
        cast = values.astype(np.float32)
    finite = np.isfinite(cast)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        row, col = divmod(bad, values.shape[1]) if values.ndim == 2 else (bad, column)
        original = values[row, col] if values.ndim == 2 else values[row]
        raise _invalid(f"{table.describe(row, col)} is {original}; every value must be a finite number that fits "
                       "in float32 (at most about 3.4e38 in size)", **table.where(row, col))
    return cast


def _targets(table: _Table, task: RequestedTask) -> tuple[np.ndarray, Task, list[int] | None]:
    _finite32(table, table.y, None)
    y = table.y.astype(np.float64)
    values, index = np.unique(y, return_inverse=True)
    if len(values) < 2:
        raise _invalid(f"every target is {values[0]}; there is nothing to learn from a single value")
    integral = bool(np.all(values == np.round(values)))
    if task == "auto":
        if integral and len(values) <= AUTO_MAX_CLASSES:
            task = "binary" if len(values) == 2 else "classification"
        else:
            task = "regression"
    if task == "regression":
        return y.astype(np.float32), Task.regression, None
    if not integral:
        row = int(np.flatnonzero(y != np.round(y))[0])
        raise _invalid(f"task {task} needs integer class labels, but {table.describe(row, None)} is {y[row]}; use "
                       "task regression (or auto)", field="body.task", **table.where(row, None))
    if task == "binary" and len(values) != 2:
        raise _invalid(f"task binary needs exactly 2 distinct labels, but the targets hold {len(values)}; use task "
                       "classification (or auto)", field="body.task")
    if len(values) > MAX_CLASSES:
        raise _invalid(f"the targets hold {len(values)} distinct labels; a classifier may have at most {MAX_CLASSES}; "
                       "use task regression", field="body.task")
    return index.astype(np.int64), Task(task), [int(v) for v in values]


def parse_upload(file: BinaryIO, task: RequestedTask, target: str | None, max_bytes: int) -> Parsed:
    head = file.read(8192)
    file.seek(0)
    if not head:
        raise _invalid(f"the file is empty; {FORMATS}")
    if head[:4] in ZIP_MAGIC:
        table = _read_npz(file, max_bytes)
        if target is not None:
            raise _invalid("target names a CSV column; an NPZ archive's targets are its array y, so leave target "
                           "out", field="body.target")
    elif b"\0" in head:  # binary, or text in UTF-16 or UTF-32
        raise _invalid(f"the file is neither an NPZ archive nor UTF-8 text; {FORMATS}")
    else:
        table = _read_csv(file, target)
    if len(table.x) < MIN_ROWS:
        rows = len(table.x)
        raise _invalid(f"the file has {rows} row{'' if rows == 1 else 's'} of data; at least {MIN_ROWS} are needed")
    x = _finite32(table, table.x, None)
    y, resolved, labels = _targets(table, task)
    return Parsed(x, y, resolved, None if labels is None else len(labels), labels)


# --- the service ----------------------------------------------------------------------------------------


def create_dataset(
    session: Session, store: Store, owner: str, *, name: str, task: RequestedTask, target: str | None,
    file: BinaryIO,
) -> Dataset:
    parsed = parse_upload(file, task, target, get_settings().max_upload_bytes)
    dataset_id = str(uuid.uuid4())
    data = save({"x": parsed.x, "y": parsed.y}, metadata={"format": FORMAT})
    # The file first: a row never names a file that is not there (a failed commit leaves an unnamed file).
    store.put_dataset(dataset_id, data)
    dataset = Dataset(
        id=dataset_id, owner=owner, name=name, task=parsed.task, rows=parsed.x.shape[0],
        features=parsed.x.shape[1], classes=parsed.classes, labels=parsed.labels, input_shape=[parsed.x.shape[1]],
        created_at=utcnow(), sha256=hashlib.sha256(data).hexdigest(),
    )
    session.add(dataset)
    session.commit()
    return dataset


def get_dataset(session: Session, owner: str, dataset_id: str) -> Dataset:
    dataset = None
    if is_id(dataset_id):  # anything else names no dataset, and never reaches the database
        dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner))
    if dataset is None:
        raise NotFound(f"No dataset with id {dataset_id[:100]!r}.")
    return dataset


def list_datasets(session: Session, owner: str, *, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
    """Newest first; keyset pagination, with the same cursors as the job list."""
    query = (
        select(Dataset)
        .where(Dataset.owner == owner)
        .order_by(Dataset.created_at.desc(), Dataset.id.desc())
        .limit(limit + 1)
    )
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            (Dataset.created_at < created_at) | and_(Dataset.created_at == created_at, Dataset.id < last_id)
        )
    rows = list(session.scalars(query))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
