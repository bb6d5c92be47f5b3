"""Wire format: factors only, fp16 halves the bytes, counted bytes match the theory."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedlora.adapters import get_lora_state
from fedlora.records import factor_bytes, from_array_record, to_array_record
from fedlora.validation import reply_problem


def test_round_trip_float32_is_exact(tiny_slot):
    state = {k: torch.randn_like(v)
             for k, v in get_lora_state(tiny_slot.model, tiny_slot.adapter).items()}
    back = from_array_record(to_array_record(state))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_bytes_near_the_theoretical_minimum_and_fp16_halves_them(tiny_slot):
    state = get_lora_state(tiny_slot.model, tiny_slot.adapter)
    params = sum(v.numel() for v in state.values())
    fp32 = factor_bytes(to_array_record(state, "float32"))
    fp16 = factor_bytes(to_array_record(state, "float16"))
    # packed: one data array + a JSON index of the keys and shapes (~60 bytes per factor)
    assert params * 4 < fp32 <= params * 4 + 1024 + 100 * len(state)
    assert fp32 - fp16 == params * 2  # same index and headers, half the payload
    back = from_array_record(to_array_record(state, "float16"))
    assert back[next(iter(state))].dtype == torch.float16


def test_reply_problem_finds_each_kind_of_bad_reply():
    expected = {"a": (2, 3)}
    ok = {"a": torch.zeros(2, 3)}
    assert reply_problem(ok, expected, 5) is None
    assert "num-examples" in reply_problem(ok, expected, 0)
    assert "num-examples" in reply_problem(ok, expected, 2.5)
    assert "missing ['a']" in reply_problem({}, expected, 5)
    assert "shape (3, 2)" in reply_problem({"a": torch.zeros(3, 2)}, expected, 5)
    assert "NaN or Inf" in reply_problem({"a": torch.full((2, 3), float("nan"))}, expected, 5)
    assert "NaN or Inf" in reply_problem({"a": torch.full((2, 3), float("inf"))}, expected, 5)
    assert "dtype" in reply_problem({"a": torch.zeros(2, 3, dtype=torch.int64)}, expected, 5)


def test_factors_travel_packed_in_two_arrays(tiny_slot):
    state = get_lora_state(tiny_slot.model, tiny_slot.adapter)
    record = to_array_record(state)
    assert set(record) == {"data", "index"} and len(state) > 2
    assert set(from_array_record(record)) == set(state)


@pytest.mark.parametrize("index, data, message", [
    (b"not json", np.zeros(6, np.float32), "unreadable index"),
    (b'[["a", [2, 3]]]', np.zeros(5, np.float32), "describes 6 values, the data holds 5"),
    (b'[["a", [2, 3]], ["a", [0]]]', np.zeros(6, np.float32), "repeats a key"),
    (b'[["a", [-2, -3]]]', np.zeros(6, np.float32), "negative dimension"),
    (b'[["a", "xy"]]', np.zeros(6, np.float32), "unreadable index"),
])
def test_a_malformed_packed_record_is_refused(index, data, message):
    record = ArrayRecord({"index": Array(np.frombuffer(index, np.uint8).copy()),
                          "data": Array(data)})
    with pytest.raises(ValueError, match=message):
        from_array_record(record)


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float32).reshape(3, 4),
                                   np.ones(5, np.float16), np.zeros(0, np.float32),
                                   np.array(3.5), np.arange(6.0).reshape(2, 3).T],
                         ids=["float32", "float16", "empty", "scalar", "fortran-order"])
def test_reading_an_array_with_one_copy_gives_what_np_load_gives(array):
    from fedlora.records import npy_array

    wire = Array(array)
    got, want = npy_array(wire), wire.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable  # torch shares it without a copy or a warning


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("sizes", [[3, 4, 0, 5], [0], [2 ** 16 + 3]])
def test_a_packed_concatenation_is_byte_for_byte_what_numpy_saves(dtype, sizes):
    """to_array_record's data array, made with one copy, is the .npy bytes Flower's own
    Array(np.concatenate(...)) holds (np.save), and reads back with np.load."""
    from fedlora.records import npy_concatenation

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(n).astype(dtype) for n in sizes]
    ours, flowers = npy_concatenation(parts), Array(np.concatenate(parts))
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape,
                                                    flowers.stype)
    assert ours.data == flowers.data
    assert np.array_equal(ours.numpy(), np.concatenate(parts))


def test_an_array_whose_header_and_data_disagree_is_refused():
    from fedlora.records import npy_array

    wire = Array(np.arange(8, dtype=np.float32))
    short = Array(dtype=wire.dtype, shape=wire.shape, stype=wire.stype, data=wire.data[:-4])
    with pytest.raises(ValueError, match="header describes 8 values of float32"):
        npy_array(short)
    buffer = io.BytesIO()  # a hostile sender's pickled array (Flower never makes one)
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    pickled = Array(dtype="object", shape=(1,), stype=wire.stype, data=buffer.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):  # left to np.load, which refuses
        npy_array(pickled)
