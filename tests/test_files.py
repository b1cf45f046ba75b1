"""The one atomic writer and the one JSON conversion (`io.files`)."""

import json
import os
import stat

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jackpots_jax.io import files


def test_atomic_path_renames_a_finished_file_with_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with files.atomic_path(tmp_path / "sub" / "a.npz") as tmp:
            assert os.path.dirname(tmp) == str(tmp_path / "sub")
            assert tmp.endswith(".npz") and os.path.exists(tmp)  # same suffix, already there
            np.savez(tmp, x=np.arange(3))
            assert not (tmp_path / "sub" / "a.npz").exists()  # not before the block ends
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "sub" / "a.npz").st_mode) == 0o640
    with np.load(tmp_path / "sub" / "a.npz") as f:
        np.testing.assert_array_equal(f["x"], np.arange(3))
    assert os.listdir(tmp_path / "sub") == ["a.npz"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "r.json"
    files.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="half-way"):
        with files.atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write("{")
            raise RuntimeError("half-way")
    assert files.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_jsonable_converts_what_a_run_produces_and_names_what_it_cannot():
    config = ml_collections.ConfigDict({"dense": ("head",), "lr": 0.1})
    value = {
        "f32": np.float32(0.5),
        "i64": np.int64(7),
        "array": jnp.arange(3),
        "scalar": jnp.float32(2.0),
        "tuple": (1, (2, 3)),
        "set": {"b", "a"},
        "config": config,
        5: None,
    }
    assert files.jsonable(value) == {
        "f32": 0.5,
        "i64": 7,
        "array": [0, 1, 2],
        "scalar": 2.0,
        "tuple": [1, [2, 3]],
        "set": ["a", "b"],
        "config": {"dense": ["head"], "lr": 0.1},
        "5": None,
    }
    assert json.loads(json.dumps(files.jsonable(value))) == files.json_round_trip(value)
    with pytest.raises(TypeError, match=r"`extra\['data'\]\[1\]` must be JSON-serialisable"):
        files.jsonable({"data": [1, object()]}, "extra")
