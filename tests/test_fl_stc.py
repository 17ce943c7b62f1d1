"""gpucabac.fl.stc: sparse ternary compression (Sattler et al. 2019) as an exact bitstream."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpucabac.errors import FormatError, InputError
from gpucabac.fl import stc
from gpucabac.fl.feedback import ErrorFeedback
from gpucabac.fl.update import apply_update, base_digest


def _base(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv/kernel": rng.normal(0, 0.1, (3, 3, 4, 8)).astype(np.float32),
            "conv/bias": np.zeros(8, np.float32),
            "dense/kernel": rng.normal(0, 0.05, (32, 10)).astype(np.float32),
            "bn/count": np.array([7], np.int64)}


def _update(seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in _base().items() if v.dtype.kind == "f"}


# --- ternarisation ---------------------------------------------------------------------------------


def test_ternarize_keeps_exactly_k_of_largest_magnitude_as_plus_minus_mu():
    x = np.array([0.5, -2.0, 0.1, 3.0, -0.2, 1.0, -1.5, 0.05, 0.0, 0.7], np.float32)
    tern, mus = stc.ternarize({"t": x}, 0.3)  # k = 3: 3.0, -2.0, -1.5
    mu = np.float32((3.0 + 2.0 + 1.5) / 3)
    assert mus["t"] == float(mu)
    expected = np.zeros(10, np.float32)
    expected[[1, 3, 6]] = [-mu, mu, -mu]
    assert tern["t"].tobytes() == expected.tobytes()  # +0.0 where nothing was kept


@pytest.mark.parametrize("n, density, k", [(10, 0.3, 3), (1000, 0.01, 10), (100, 0.29, 29), (50, 0.001, 1),
                                           (7, 1.0, 7), (1, 0.001, 1)])
def test_the_kept_count_is_max_of_rounded_pn_and_one(n, density, k):
    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    tern, _ = stc.ternarize({"t": x}, density)
    assert stc.stc_count(density, n) == k
    assert np.count_nonzero(tern["t"]) == k


def test_ties_keep_the_lower_index_and_kept_zeros_stay_zero():
    tern, mus = stc.ternarize({"t": np.array([1, -1, 1, -1, 1], np.float32)}, 0.4)
    assert tern["t"].tolist() == [1, -1, 0, 0, 0] and mus["t"] == 1.0
    tern, mus = stc.ternarize({"z": np.array([0, 0, 2, 0], np.float32)}, 0.5)  # k = 2: 2.0 and a zero
    assert tern["z"].tolist() == [0, 0, 1, 0] and mus["z"] == 1.0  # μ = (2 + 0) / 2


def test_mu_is_the_mean_magnitude_of_the_kept_values_in_float32():
    x = np.random.default_rng(3).normal(size=(64, 32)).astype(np.float32)
    tern, mus = stc.ternarize({"w": x}, 0.05)
    kept = np.sort(np.abs(x).ravel())[::-1][:stc.stc_count(0.05, x.size)]
    assert mus["w"] == float(np.float32(kept.astype(np.float64).mean()))
    assert set(np.abs(tern["w"][tern["w"] != 0]).tolist()) == {mus["w"]}


# --- the Golomb position code ------------------------------------------------------------------------


@pytest.mark.parametrize("p, b", [(0.5, 0), (0.3, 1), (0.1, 3), (0.05, 4), (0.01, 6), (0.001, 9), (1.0, 0)])
def test_the_golomb_parameter_is_the_papers_formula(p, b):
    # by hand: 1 + floor(log2(log(0.618...)/log(1 - p))), e.g. p = 0.01: log2(0.4812 / 0.01005) = 5.58 -> 6
    assert stc.golomb_parameter(p) == b
    if p < 1:
        assert b == max(0, 1 + math.floor(math.log2(math.log((math.sqrt(5) - 1) / 2) / math.log(1 - p))))


def test_rice_codes_of_hand_computed_gaps():
    # gaps 0, 4, 0, 13 at b = 2: 0|00, 10|00, 0|00, 1110|01, each followed by its sign bit
    bits = stc.rice_bits([0, 4, 0, 13], 2, [False, True, False, True])
    assert "".join(map(str, bits)) == "0000" + "10001" + "0000" + "1110011"
    assert stc.rice_bits([5], 0).tolist() == [1, 1, 1, 1, 1, 0]  # b = 0: unary
    assert stc.rice_bits([5], 3).tolist() == [0, 1, 0, 1]  # q = 0, r = 101
    assert stc.rice_bits([8], 3).tolist() == [1, 0, 0, 0, 0]  # q = 1, r = 000


def test_a_stream_holds_the_hand_computed_code():
    base = {"t": np.zeros(21, np.float32)}
    x = np.zeros(21, np.float32)
    x[[0, 5, 6, 20]] = [0.5, -0.5, 0.5, -0.5]  # gaps 0, 4, 0, 13; density 4/21: b = 2
    data = stc.encode_ternary({"t": x}, base)
    assert stc.golomb_parameter(4 / 21) == 2
    payload = 20  # bits, as in test_rice_codes_of_hand_computed_gaps
    assert len(data) == 44 + (2 + 1 + 1 + 4 + 13) + math.ceil(payload / 8) + 4
    body = data[44 + 2 + 1 + 1 + 4:-4]
    assert struct.unpack_from("<IfBI", body) == (4, 0.5, 2, 3)
    assert body[13:] == bytes([0b00001000, 0b10000111, 0b00110000])
    assert stc.read_stc(data, base).deltas["t"].tobytes() == x.tobytes()


@pytest.mark.parametrize("p", [0.1, 0.01, 0.001])
def test_position_bits_match_the_papers_estimate(p):
    """Rate as an inequality: Bernoulli(p) positions cost, per non-zero, within 3% of the paper's
    b* + 1/(1 − (1 − p)^(2^b*)) + 1 (the header aside)."""
    n = 2_000_000
    rng = np.random.default_rng(7)
    x = np.where(rng.random(n) < p, np.float32(1), np.float32(0)) * np.where(rng.random(n) < 0.5, 1, -1)
    x = x.astype(np.float32)
    nnz = np.count_nonzero(x)
    data = stc.encode_ternary({"t": x}, {"t": np.zeros(n, np.float32)})
    bits = 8 * (len(data) - (44 + 2 + 1 + 1 + 4 + 13 + 4))
    assert bits / nnz == pytest.approx(stc.expected_bits(p), rel=0.03)
    # and never below the entropy of the positions plus one bit per sign
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / p
    assert bits / nnz >= h + 1


# --- the stream ------------------------------------------------------------------------------------


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
                  elements=st.floats(-10, 10, width=32)),
       st.floats(0.001, 1.0), st.booleans())
def test_round_trip_is_bit_exact(x, density, empty_too):
    base = {"t": np.ones(x.shape, np.float32), "other": np.zeros((2, 2), np.float32)}
    update = {"t": x} | ({"other": np.zeros((2, 2), np.float32)} if empty_too else {})
    tern, _ = stc.ternarize(update, density)
    data = stc.encode_stc(update, base, density)
    got = stc.read_stc(data, base)
    assert got.base_digest == base_digest(base) and set(got.deltas) == set(update) and not got.values
    for k in tern:
        assert got.deltas[k].dtype == np.float32 and got.deltas[k].tobytes() == tern[k].tobytes()
    assert stc.encode_ternary(got.deltas, base) == data  # and back to the same bytes


def test_applying_an_update_adds_the_ternary_tensors():
    base, upd = _base(), _update()
    floats = {k: v for k, v in upd.items()}
    data = stc.encode_stc(floats, base, 0.1)
    new = apply_update(stc.read_stc(data, base), base)
    tern, _ = stc.ternarize(floats, 0.1)
    for k in tern:
        np.testing.assert_array_equal(new[k], base[k] + tern[k])
    assert new["bn/count"] is base["bn/count"]


def test_error_accumulation_identity():
    """Over T rounds: the sum of the decoded updates plus the last residual is the sum of the
    true updates (to float rounding), and the residual is intended − decoded exactly."""
    base = _base()
    fb = ErrorFeedback()
    true_sum, decoded_sum = {}, {}
    for t in range(6):
        upd = _update(seed=10 + t)
        intended = fb.add(upd)
        decoded = stc.read_stc(stc.encode_stc(intended, base, 0.02), base).deltas
        fb.keep(intended, decoded)
        for k in upd:
            np.testing.assert_array_equal(fb.residual[k], intended[k] - decoded[k])
            true_sum[k] = true_sum.get(k, 0) + upd[k].astype(np.float64)
            decoded_sum[k] = decoded_sum.get(k, 0) + decoded[k].astype(np.float64)
    for k in true_sum:
        np.testing.assert_allclose(decoded_sum[k] + fb.residual[k], true_sum[k], atol=1e-6)
        assert np.abs(fb.residual[k]).max() > 0  # something was left out and carried


def test_every_truncation_and_every_flipped_byte_is_a_format_error():
    base = _base()
    data = stc.encode_stc(_update(), base, 0.1)
    for n in range(len(data)):
        with pytest.raises(FormatError):
            stc.read_stc(data[:n], base)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(FormatError):
            stc.read_stc(bytes(bad), base)
    with pytest.raises(FormatError, match="between its last tensor"):
        stc.read_stc(_with_crc(data[:-4] + b"\0"), base)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _record(name: str, shape, nnz, mu, b, payload: bytes) -> bytes:
    encoded = name.encode()
    return (struct.pack("<H", len(encoded)) + encoded + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
            + struct.pack("<IfBI", nnz, mu, b, len(payload)) + payload)


def _stream(base, *records) -> bytes:
    return _with_crc(struct.pack("<4sB3s32sI", b"GSTC", 1, b"\0\0\0", base_digest(base), len(records)) + b"".join(records))


@pytest.mark.parametrize("records, message", [
    ([_record("t", (8,), 1, 1.0, 0, bytes([0b11111111, 0b11000000]))], "past its 8 entries"),  # gap 10
    ([_record("t", (8,), 2, 1.0, 0, bytes([0b00000000]))], ""),  # sane: two codes at 0 and 1
    ([_record("t", (8,), 1, 1.0, 0, bytes([0b00100000]))], "bits after"),  # padding not zero
    ([_record("t", (8,), 1, 1.0, 0, bytes([0b00000000, 0]))], "bits after"),  # a spare byte
    ([_record("t", (8,), 5, 1.0, 0, bytes([0b00000000]))], "ends inside code 4"),
    ([_record("t", (8,), 1, -1.0, 0, bytes([0]))], "μ"),
    ([_record("t", (8,), 1, float("nan"), 0, bytes([0]))], "μ"),
    ([_record("t", (8,), 9, 1.0, 0, bytes(3))], "9 non-zeros in 8"),
    ([_record("t", (8,), 1, 1.0, 40, bytes(6))], "Golomb parameter"),
    ([_record("t", (4, 2), 1, 1.0, 0, bytes([0]))], "shape"),
    ([_record("nope", (8,), 1, 1.0, 0, bytes([0]))], "not in the base"),
    ([_record("n", (1,), 1, 1.0, 0, bytes([0]))], "not a float"),
    ([_record("t", (8,), 1, 1.0, 0, bytes([0]))] * 2, "twice"),
])
def test_bad_fields_name_the_problem(records, message):
    base = {"t": np.zeros(8, np.float32), "n": np.zeros(1, np.int32)}
    data = _stream(base, *records)
    if not message:
        np.testing.assert_array_equal(stc.read_stc(data, base).deltas["t"], [1, 1, 0, 0, 0, 0, 0, 0])
        return
    with pytest.raises(FormatError, match=message):
        stc.read_stc(data, base)


def test_header_fields_are_checked():
    base = _base()
    data = stc.encode_stc(_update(), base, 0.1)
    for at, value, message in [(0, b"GCBU", "magic"), (4, b"\x02", "version"), (5, b"\x01", "reserved"),
                               (40, struct.pack("<I", (1 << 20) + 1), "more than")]:
        bad = data[:at] + value + data[at + len(value):]
        with pytest.raises(FormatError, match=message):
            stc.read_stc(_with_crc(bad[:-4]), base)


def test_another_base_is_an_input_error_and_the_base_stays():
    base, other = _base(0), _base(5)
    data = stc.encode_stc(_update(), base, 0.1)
    before = {k: v.copy() for k, v in other.items()}
    with pytest.raises(InputError, match="another base"):
        stc.read_stc(data, other)
    assert all(np.array_equal(before[k], other[k]) for k in other)
    # a digest the caller holds: the same stream, the same check
    ternary, _ = stc.ternarize(_update(), 0.1)
    assert stc.encode_ternary(ternary, base, digest=base_digest(base)) == stc.encode_ternary(ternary, base)
    with pytest.raises(InputError, match="another base"):
        stc.read_stc(data, other, digest=base_digest(other))
    with pytest.raises(InputError, match="digest must be"):
        stc.read_stc(data, base, digest=b"short")


def test_the_encoder_refuses_what_is_not_ternary_or_not_the_base():
    base = _base()
    with pytest.raises(InputError, match="not ternary"):
        stc.encode_ternary({"dense/kernel": np.full((32, 10), 0.5, np.float32) * np.arange(10)}, base)
    with pytest.raises(InputError, match="not in the base"):
        stc.encode_ternary({"zzz": np.zeros(3, np.float32)}, base)
    with pytest.raises(InputError, match="shape"):
        stc.encode_ternary({"conv/bias": np.zeros(9, np.float32)}, base)
    with pytest.raises(InputError, match="float tensors only"):
        stc.encode_ternary({"bn/count": np.zeros(1, np.float32)}, base)
    with pytest.raises(InputError, match="density"):
        stc.ternarize({"t": np.ones(3, np.float32)}, 1.5)
    with pytest.raises(InputError, match="NaN"):
        stc.ternarize({"t": np.array([np.nan], np.float32)}, 0.5)
