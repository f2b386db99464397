"""What ``--input`` points at → record sources.

Each input is, in this order of precedence:
  * an existing file: JSON array, JSONL or parquet (witscale/data/readers.py);
  * a glob (``data/*.jsonl``, ``shards/**/*.parquet``): every matching file, sorted; no match is an error;
  * an existing directory: a dataset written with ``datasets``' ``save_to_disk`` (``load_from_disk``), or
    any directory ``datasets.load_dataset`` understands (a folder of jsonl/json/parquet/csv files, a cloned
    Hub dataset repository);
  * otherwise a Hugging Face Hub dataset name (``owner/name``), loaded with ``datasets.load_dataset`` —
    from the local cache when ``HF_DATASETS_OFFLINE=1``.
Datasets take ``--split`` (default: ``train``, or the only split) and ``--subset`` (the configuration name).
A dataset's records are read row by row as ``record N``; null fields count as absent, as in parquet.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from typing import Any, Iterator, NamedTuple

from witscale.data.errors import DataError
from witscale.data.readers import drop_nulls

_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_EXTENSIONS = (".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".csv", ".txt", ".arrow")


class Source(NamedTuple):
    kind: str                  # 'file' | 'dataset'
    path: str                  # the file, the directory or the Hub name
    split: str | None = None
    subset: str | None = None

    @property
    def name(self) -> str:
        """How messages and the manifest name this source: the path, or 'name[split]' for a dataset."""
        if self.kind == "file":
            return self.path
        return f"{self.path}[{self.subset + '/' if self.subset else ''}{self.split or 'train'}]"


def resolve_inputs(inputs: list[str], split: str | None = None, subset: str | None = None) -> list[Source]:
    """--input values → sources, in the order given (a glob's matches sorted)."""
    if not inputs:
        raise DataError("no input files")
    out: list[Source] = []
    for spec in inputs:
        if os.path.isfile(spec):
            out.append(Source("file", spec))
        elif os.path.isdir(spec):
            out.append(Source("dataset", spec, split, subset))
        elif _GLOB_CHARS.search(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError("no file matches this pattern", spec)
            out += [Source("file", p) for p in matches]
        elif _looks_like_hub_id(spec):
            out.append(Source("dataset", spec, split, subset))
        else:
            raise DataError("no such file or directory", spec)
    return out


def _looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.fullmatch(spec)) and not spec.lower().endswith(_FILE_EXTENSIONS)


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names


def load_dataset_source(src: Source):
    """The ``datasets.Dataset`` of one dataset source (one split). Errors are one-line DataErrors."""
    try:
        import datasets
    except ImportError:
        raise DataError("reading a dataset directory or Hub name needs the 'datasets' package", src.path) from None
    where = src.path
    try:
        if os.path.isdir(src.path) and _is_saved_dataset(src.path):
            if src.subset:
                raise DataError("--subset does not apply to a dataset saved with save_to_disk", where)
            ds = datasets.load_from_disk(src.path)
        else:
            ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    except DataError:
        raise
    except Exception as e:   # datasets raises many types (FileNotFoundError, ValueError, ConnectionError …)
        msg = " ".join(str(e).split())
        if len(msg) > 300:
            msg = msg[:300] + " …"
        kind = "dataset directory" if os.path.isdir(src.path) else "Hugging Face dataset (no such file either)"
        raise DataError(f"cannot load as a {kind}: {type(e).__name__}: {msg}", where) from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = sorted(ds)
        if src.split is not None:
            if src.split not in ds:
                raise DataError(f"no split {src.split!r}; the dataset has {', '.join(splits)}", where)
            ds = ds[src.split]
        elif "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"the dataset has splits {', '.join(splits)} and none is 'train': pass --split", where)
    elif src.split is not None and ds.split is not None and str(ds.split) != src.split:
        raise DataError(f"the saved dataset holds split {str(ds.split)!r}, not {src.split!r}", where)
    if len(ds) == 0:
        raise DataError("the dataset has no records", src.name)
    return ds


def iter_dataset(ds) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(ds, 1):
        yield f"record {i}", drop_nulls(rec)


def dataset_digest(ds) -> str:
    """sha256 over the dataset's Arrow files (what the packed data was made from); its fingerprint if none."""
    files = [f["filename"] for f in getattr(ds, "cache_files", []) or []]
    if not files:
        return "fingerprint:" + str(getattr(ds, "_fingerprint", ""))
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
