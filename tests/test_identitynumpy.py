"""numpy and pandas values' identity (identitynumpy.py): by dtype, shape and values, by index
and names; equal whatever the memory layout, different when any of them differs."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pandas as pd

from poolmagic.identity import digest


def test_numpy_by_dtype_shape_and_values():
    a = np.arange(12.0).reshape(3, 4)
    assert digest(a) == digest(a.copy()) == digest(np.asfortranarray(a))  # C-order bytes, any layout
    assert digest(a) != digest(a.T.copy().T.reshape(4, 3))
    assert digest(a) != digest(a.astype(np.float32)) != digest(a.reshape(2, 6))
    assert digest(a[:, ::2]) == digest(np.ascontiguousarray(a[:, ::2]))
    b = a.copy()
    b[2, 3] = -1
    assert digest(a) != digest(b)
    assert digest(np.array(["2020-01-01"], "M8[ns]")) != digest(np.array(["2020-01-02"], "M8[ns]"))
    objs = np.array([1, "a", frozenset({"x", "y"})], dtype=object)
    assert digest(objs) == digest(copy.deepcopy(objs))
    assert digest(np.float64(0.5)) != digest(np.array(0.5))  # a scalar is not a 0-d array


def test_pandas_by_values_dtypes_index_and_names():
    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"], "c": pd.Categorical(["u", "v", "u"]),
                       "d": pd.array([1, None, 3], dtype="Int64")}, index=[10, 20, 30])
    assert digest(df) == digest(df.copy()) == digest(pickle.loads(pickle.dumps(df)))
    assert digest(df) != digest(df.rename(columns={"a": "A"}))
    assert digest(df) != digest(df.set_axis([10, 20, 31]))
    assert digest(df) != digest(df.assign(a=[1.0, 2.0, 3.0]))  # same values, another dtype
    changed = df.copy()
    changed.loc[20, "b"] = "Y"
    assert digest(df) != digest(changed)
    assert digest(df["a"]) != digest(df["a"].rename("other"))
    rows = list(df.itertuples())
    assert [digest(r) for r in rows] == [digest(r) for r in pd.DataFrame(df).itertuples()]
    assert digest(rows[0]) != digest(tuple(rows[0]))  # a row is its class and fields, not a bare tuple
    assert digest(list(df.rename(columns={"a": "A"}).itertuples())[0]) != digest(rows[0])
