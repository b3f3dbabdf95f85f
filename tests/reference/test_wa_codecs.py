"""W+A quantization codecs (reference/wa_codecs.py), pinned to the contract's test vectors (part 3, section 16.6:
E4M3 bytes, the FP4 mini block, the seeded NVFP4 matrix's SHA-256) and cross-checked against torch's and
ml_dtypes' float8_e4m3fn / float4_e2m1fn."""

import hashlib

import ml_dtypes
import numpy as np
import pytest

from onnx_rewriter.reference import wa_codecs as C

MINI_BLOCK = [0, .25, .26, .75, .8, 1.25, 1.3, 1.75, 2, 2.5, 2.6, 3.5, 3.6, 5, 5.1, -6]


def _seeded():
    return (np.random.default_rng(20240607).standard_normal((32, 64)) * 0.02).astype(np.float32)


def test_e4m3_contract_bytes():
    got = C.e4m3_encode([1.0, 0.5, 448, 500, 2.0 ** -9, 1 / 6, 0.003])
    assert got.tolist() == [56, 48, 126, 126, 1, 35, 2]


def test_e4m3_specials_saturate_and_nan():
    got = C.e4m3_encode([np.inf, -np.inf, -500, 1e30, np.nan, -0.0, 0.0, 2.0 ** -11, 2.0 ** -10 * 3])
    assert got.tolist() == [126, 254, 254, 126, 0x7F, 0x80, 0, 0, 2]
    assert np.isnan(C.e4m3_decode(np.array([0x7F, 0xFF], np.uint8))).all()


def test_e4m3_decode_table_matches_ml_dtypes_and_torch():
    import torch

    codes = np.arange(256, dtype=np.uint8)
    ours = C.e4m3_decode(codes)
    theirs = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    torchs = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, torchs)
    finite = ~np.isnan(ours)
    assert np.array_equal(C.e4m3_encode(ours[finite]), codes[finite])  # every code round-trips, -0 included


def test_e4m3_encode_matches_torch_round_to_nearest_even():
    """Random values over the whole range plus every exact midpoint between neighbouring codes (the ties)."""
    import torch

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * np.exp2(rng.uniform(-12, 9, 20000))).astype(np.float32)
    pos = C.e4m3_decode(np.arange(0, 127, dtype=np.uint8)).astype(np.float64)
    mids = ((pos[1:] + pos[:-1]) / 2).astype(np.float32)  # exact in fp32; ties go to the even code
    x = np.concatenate([x, mids, -mids])
    clipped = np.clip(x, -448, 448)
    expect = torch.from_numpy(clipped).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(C.e4m3_encode(x), expect)
    assert (C.e4m3_encode(mids) % 2 == 0).all()


def test_e2m1_mini_block_and_bytes():
    packed, sblk, s_g = C.nvfp4_quantize_weight(np.array([MINI_BLOCK], np.float32), scale_2=1.0)
    assert sblk.tolist() == [[56]]
    assert C.unpack_fp4(packed).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 15]]
    assert packed.tolist() == [[0, 17, 34, 51, 68, 85, 102, 247]]


def test_e2m1_ties():
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75])
    assert C.e2m1_encode(ties, ties="smaller").tolist() == [0, 1, 2, 3, 4, 5, 6, 9]
    assert C.e2m1_encode(ties, ties="even").tolist() == [0, 2, 2, 4, 4, 6, 6, 10]
    assert C.e2m1_encode([7.0, -100.0, -0.1]).tolist() == [7, 15, 8]  # saturates at 6; -0 keeps the sign


def test_e2m1_decode_matches_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    theirs = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)  # ml_dtypes: one code a byte, low nibble
    np.testing.assert_array_equal(C.e2m1_decode(codes), theirs)
    values = C.e2m1_decode(codes)
    assert np.array_equal(C.e2m1_encode(values, ties="even")[values != 0], codes[values != 0])


def test_pack_order_low_nibble_is_even_k():
    codes = np.array([[1, 2, 3, 4]], np.uint8)
    assert C.pack_fp4(codes).tolist() == [[0x21, 0x43]]
    rng = np.random.default_rng(1)
    c = rng.integers(0, 16, (5, 3, 32)).astype(np.uint8)
    np.testing.assert_array_equal(C.unpack_fp4(C.pack_fp4(c)), c)


def test_seeded_nvfp4_matrix_sha256():
    packed, sblk, s_g = C.nvfp4_quantize_weight(_seeded())
    assert np.float32(s_g).view(np.uint32) == 0x37CA8C2B and np.float32(s_g) == np.float32(2.4145547e-05)
    assert packed.shape == (32, 32) and packed[0, :8].tolist() == [168, 127, 65, 177, 227, 33, 204, 34]
    assert hashlib.sha256(packed.tobytes()).hexdigest() == \
        "e60c9c852a69c9fca099f315e5d14316198c87924e0e42860d1201b27dd557eb"
    assert sblk.shape == (32, 4) and sblk[0].tolist() == [126, 121, 119, 122]
    assert hashlib.sha256(sblk.tobytes()).hexdigest() == \
        "1230b4a44646dca3efd89e6d1b0023df6c0d1e4194f012ead6065b6af7951a85"


def test_nvfp4_dequantize_uses_each_blocks_own_scale():
    """Blocks of one row get very different scales: a scale read for the wrong block of 16 is far off."""
    w = _seeded()
    w = w * np.repeat(np.exp2(np.arange(4) * 3.0), 16)[None, :]  # block j of each row 8**j larger
    packed, sblk, s_g = C.nvfp4_quantize_weight(w)
    deq = C.nvfp4_dequantize(packed, sblk, s_g)
    assert deq.shape == w.shape
    # within half an E2M1 step of the block's scale: |err| <= step (6 -> 4 is the widest gap, 2 steps)
    step = np.repeat(C.e4m3_decode(sblk) * s_g, 16, axis=-1)
    assert np.all(np.abs(deq - w) <= step + 1e-12)
    assert np.linalg.norm(deq - w) < 0.15 * np.linalg.norm(w)


def test_fp4_dynamic_quantize_blocks_and_scale():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 3, 64)) * np.array([1, 10, 0.1, 100])[np.arange(64) // 16]).astype(np.float16)
    s_in = np.float32(np.abs(x.astype(np.float32)).max() / (6 * 448))
    codes, sx = C.fp4_dynamic_quantize(x, s_in)
    assert codes.shape == x.shape and sx.shape == (2, 3, 4)
    amax = np.abs(x.astype(np.float64)).reshape(2, 3, 4, 16).max(-1)
    np.testing.assert_array_equal(sx, C.e4m3_encode((amax / (6 * np.float64(s_in))).astype(np.float32)))
    xhat = C.e2m1_decode(codes) * np.repeat(C.e4m3_decode(sx) * s_in, 16, axis=-1)
    step = np.repeat(C.e4m3_decode(sx) * s_in, 16, axis=-1)
    assert np.all(np.abs(xhat - x.astype(np.float32)) <= step)
    # zeros stay zeros, and a zero block gets scale 0
    z_codes, z_sx = C.fp4_dynamic_quantize(np.zeros((1, 16), np.float16), s_in)
    assert not z_codes.any() and not z_sx.any()


def test_int8_round_trip():
    x = np.array([0.5, 1.5, 2.5, -2.5, 127.4, 300, -300, -128.6], np.float32)
    assert C.int8_quantize(x, 1.0).tolist() == [0, 2, 2, -2, 127, 127, -128, -128]
    w = np.array([[1.0, -2.0], [30.0, 60.0]], np.float32)
    s = np.array([[2.0 / 127], [60.0 / 127]], np.float32)  # per output row
    q = C.int8_quantize(w, s)
    assert q.tolist() == [[64, -127], [63, 127]]  # 30 / fp32(60 / 127) = 63.4999...
    np.testing.assert_allclose(C.int8_dequantize(q, s), w, atol=float(s.max()) / 2)


@pytest.mark.parametrize("bad", [np.array([np.nan])])
def test_e2m1_refuses_nan(bad):
    with pytest.raises(ValueError, match="NaN"):
        C.e2m1_encode(bad)
