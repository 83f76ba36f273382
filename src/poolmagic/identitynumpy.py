"""The canonical encoding of numpy and pandas values (identityencoding.py hands them here).

numpy arrays and scalars by dtype, shape and C-order bytes (object arrays
element by element); pandas objects by their values, dtypes, index and names.
numpy and pandas are never imported here: a value can only be one if its
module is loaded, and this module is imported only when such a value is met.
"""
from __future__ import annotations

import sys
from typing import Any

from .identityencoding import LEN, Encoder


def np_array(e: Encoder, a: Any, tag: bytes = b"A") -> None:
    np = sys.modules["numpy"]
    dt = a.dtype
    e.buf += tag
    e.text(dt.str if dt.fields is None and dt.subdtype is None else repr(dt.descr))
    e.buf += LEN.pack(a.ndim) + b"".join(LEN.pack(n) for n in a.shape)
    if dt.hasobject:
        e.child("", a.tolist())
    elif a.nbytes:
        c = np.ascontiguousarray(a).reshape(-1)
        e.big(c.view(np.uint8))
    else:
        e.big(b"")


def np_subclass(e: Encoder, a: Any) -> None:
    e.name(b"X", type(a))
    np_array(e, a.view(sys.modules["numpy"].ndarray))


def np_scalar(e: Encoder, v: Any) -> None:
    np_array(e, sys.modules["numpy"].asarray(v), b"a")


def pandas(e: Encoder, v: Any) -> None:
    pd = sys.modules["pandas"]
    e.name(b"P", type(v))
    if isinstance(v, pd.DataFrame):
        _pd_index(e, v.columns)
        _pd_index(e, v.index)
        for j in range(v.shape[1]):
            e.path.append(f"[column {j}]")
            _pd_values(e, v.iloc[:, j])
            e.path.pop()
    elif isinstance(v, pd.Series):
        e.child(".name", v.name)
        _pd_values(e, v)
        _pd_index(e, v.index)
    else:
        _pd_index(e, v)


def _pd_index(e: Encoder, idx: Any) -> None:
    e.child(".names", list(idx.names))
    levels = [idx.get_level_values(k) for k in range(idx.nlevels)] if idx.nlevels > 1 else [idx]
    e.buf += LEN.pack(len(levels))
    for level in levels:
        _pd_values(e, level)


def _pd_values(e: Encoder, obj: Any) -> None:
    """A Series' or Index's values with their dtype, as stably as pandas allows."""
    np = sys.modules["numpy"]
    pd = sys.modules["pandas"]
    dt = obj.dtype
    e.text(str(dt))
    if isinstance(dt, np.dtype) and not dt.hasobject:
        np_array(e, np.asarray(obj))
    elif isinstance(dt, pd.CategoricalDtype):
        e.buf += b"k" + (b"o" if dt.ordered else b"u")
        _pd_values(e, pd.Index(dt.categories))
        np_array(e, np.asarray(obj.cat.codes if isinstance(obj, pd.Series) else obj.codes))
    elif isinstance(dt, np.dtype):  # object: pandas' own hash when every value is a str, else each value
        if pd.api.types.infer_dtype(obj, skipna=False) == "string":
            try:
                np_array(e, pd.util.hash_pandas_object(obj, index=False, categorize=False).to_numpy())
                return
            except UnicodeEncodeError:
                pass
        e.child("", list(obj))
    else:  # an extension dtype (nullable, tz-aware, period, interval, arrow): pandas' stable hash
        np_array(e, pd.util.hash_pandas_object(obj, index=False, categorize=False).to_numpy())
