"""Memory codecs (model/codecs.py): round trips as properties, sizes of the paper's memory, and
refusals (corrupt payloads, missing or mismatched quantizers, unknown names)."""

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from model.codecs import (
    CODECS,
    PAPER_SPEC,
    CodecError,
    Int8Codec,
    RawCodec,
    VQCodec,
    bytes_per_memory,
    default_spec,
    faiss_spec,
    make_codec,
    min_train_vectors,
)

PAPER_SHAPE = (22, 2, 8, 8, 80)  # (memory layers, K/V, KV heads, tokens, head_dim) [paper §3.1]
TINY_SHAPE = (1, 2, 2, 4, 8)  # ModelConfig preset "tiny"
DEMO_SHAPE = (3, 2, 2, 8, 32)  # preset "small", the demo model
PAPER_DENSE_BYTES = 44 * 40 * 128 * 80 * 2 * 2  # dense bf16 KV of a 128-token reference

SETTINGS = settings(max_examples=40, deadline=None)


def memory_shapes(head_dims=(2, 4, 8, 16, 32)):
    return st.tuples(st.integers(1, 3), st.just(2), st.integers(1, 3), st.integers(1, 4), st.sampled_from(head_dims))


def structured(n: int, d: int, seed: int, rank: int = 4, noise: float = 0.05) -> np.ndarray:
    """Vectors near a fixed rank-`rank` subspace (the basis depends on d only, so train and test
    draws share it): something a quantizer can learn, unlike white noise."""
    basis = np.random.default_rng(1000 + d).standard_normal((rank, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, rank)).astype(np.float32)
    return z @ basis + noise * rng.standard_normal((n, d)).astype(np.float32)


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x - y) ** 2).sum() / (x**2).sum())


def guess_err(x: np.ndarray) -> float:
    """A random guess: each vector replaced by another draw from the same distribution."""
    other = np.random.default_rng(7).permutation(x)
    return rel_err(torch.from_numpy(x), torch.from_numpy(other))


@pytest.fixture(scope="module")
def vq8():
    """The default spec for the tiny model's head_dim 8."""
    return VQCodec.train(structured(2000, 8, seed=0), seed=0, niter=5)


@pytest.fixture(scope="module")
def vq16():
    return VQCodec.train(structured(4000, 16, seed=0), seed=0, niter=10)


# ---------------------------------------------------------------------------------- raw codec


@SETTINGS
@given(shape=memory_shapes(), data=st.data())
def test_raw_fp32_is_exact(shape, data):
    x = data.draw(arrays(np.float32, (2, *shape), elements=st.floats(width=32)))
    codec = RawCodec("float32")
    payloads = codec.encode_batch(torch.from_numpy(x))
    assert payloads == [row.tobytes() for row in x]
    back = codec.decode_batch(payloads, shape).numpy()
    assert np.array_equal(back.view(np.uint32), x.view(np.uint32))  # NaN payloads and -0 too


def _finite_bits(data, shape, exponent, mantissa, name):
    """Any bit pattern of a 16-bit float except NaNs (subnormals, -0 and inf included)."""
    bits = data.draw(arrays(np.uint16, shape, elements=st.integers(0, 0xFFFF)), label=name)
    nan = ((bits & exponent) == exponent) & ((bits & mantissa) != 0)
    return np.where(nan, np.uint16(0), bits)


@SETTINGS
@given(shape=memory_shapes(), data=st.data())
def test_raw_bf16_is_bit_exact_for_bf16_input(shape, data):
    bits = _finite_bits(data, (2, *shape), 0x7F80, 0x007F, "bf16 bits")
    x = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    codec = make_codec("raw-bf16")
    payloads = codec.encode_batch(x)
    assert payloads == [row.tobytes() for row in bits]  # the tensor's own bytes
    as_bf16 = codec.decode_batch(payloads, shape, dtype=torch.bfloat16)
    assert torch.equal(as_bf16.view(torch.int16), x.view(torch.int16))
    as_f32 = codec.decode_batch(payloads, shape)
    assert torch.equal(as_f32.view(torch.int32), x.float().view(torch.int32))


@SETTINGS
@given(shape=memory_shapes(), data=st.data())
def test_raw_fp16_is_bit_exact_for_fp16_input(shape, data):
    bits = _finite_bits(data, shape, 0x7C00, 0x03FF, "fp16 bits")
    x = torch.from_numpy(bits.view(np.float16).copy())
    codec = make_codec("raw", dtype="float16")
    back = codec.decode(codec.encode(x), shape, dtype=torch.float16)
    assert torch.equal(back.view(torch.int16), x.view(torch.int16))


def test_raw_bf16_rounds_float32_like_torch():
    x = torch.randn(DEMO_SHAPE, generator=torch.Generator().manual_seed(0))
    codec = RawCodec("bfloat16")
    assert torch.equal(codec.decode(codec.encode(x), DEMO_SHAPE), x.to(torch.bfloat16).float())


# --------------------------------------------------------------------------------- int8 codec


@SETTINGS
@given(shape=memory_shapes(), data=st.data())
def test_int8_error_is_at_most_half_a_step(shape, data):
    x = data.draw(arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))
    # vectors of very different magnitudes, down to subnormal float16 scales
    mag = data.draw(arrays(np.float32, (*shape[:-1], 1), elements=st.sampled_from([1e-9, 1e-6, 1e-3, 1.0, 1e3])))
    x = x * mag
    codec = Int8Codec()
    payload = codec.encode(torch.from_numpy(x))
    assert len(payload) == bytes_per_memory(codec, shape)
    n = int(np.prod(shape[:-1]))
    scale = np.frombuffer(payload[: 2 * n], "<f2").astype(np.float32).reshape(*shape[:-1], 1)
    back = codec.decode(payload, shape).numpy()
    assert (np.abs(back - x) <= scale / 2 * (1 + 1e-5)).all()
    amax = np.abs(x).max(axis=-1, keepdims=True)
    assert (scale * 127 >= amax * (1 - 1e-6)).all()  # rounded up: no clipping
    assert (scale <= amax / 127 * (1 + 2**-10) + 2**-24).all()  # and by one step at most


def test_int8_decodes_each_code_times_its_scale_in_float32():
    """The decode is one multiply over views of the payload; what it computes is the payload's
    float16 scale times its int8 code, both as float32 (each product exact in float32)."""
    mems = torch.randn(5, *DEMO_SHAPE, generator=torch.Generator().manual_seed(3)) * 4
    payloads = Int8Codec().encode_batch(mems)
    n, d = int(np.prod(DEMO_SHAPE[:-1])), DEMO_SHAPE[-1]
    want = [
        np.frombuffer(p[2 * n :], np.int8).astype(np.float32).reshape(n, d)
        * np.frombuffer(p[: 2 * n], np.float16).astype(np.float32)[:, None]
        for p in payloads
    ]
    got = Int8Codec().decode_batch(payloads, DEMO_SHAPE)
    assert got.dtype == torch.float32 and torch.equal(got.reshape(5, n, d), torch.from_numpy(np.stack(want)))


def test_int8_zero_and_non_finite():
    codec = Int8Codec()
    zero = torch.zeros(TINY_SHAPE)
    assert torch.equal(codec.decode(codec.encode(zero), TINY_SHAPE), zero)
    bad = zero.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN or inf"):
        codec.encode(bad)
    with pytest.raises(CodecError, match="float16 scale range"):
        codec.encode(zero + 1e10)


def test_codecs_take_any_float_dtype():
    x = torch.from_numpy(structured(int(np.prod(DEMO_SHAPE[:-1])), 32, seed=3)).reshape(DEMO_SHAPE)
    for codec in (RawCodec("float32"), Int8Codec()):
        outs = [
            codec.decode(codec.encode(x.to(dt)), DEMO_SHAPE)
            for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
        ]
        assert all(o.dtype == torch.float32 for o in outs)
        assert all(rel_err(x, o) < 1e-3 for o in outs)


# ----------------------------------------------------------------------------------- VQ codec


def test_default_spec_is_the_papers_for_head_dim_80():
    assert default_spec(80) == PAPER_SPEC
    assert faiss_spec(PAPER_SPEC) == "OPQ20_80,Residual2x14,PQ8x10"
    assert faiss_spec("OPQ20_80,Residual2x14,PQ8x10") == "OPQ20_80,Residual2x14,PQ8x10"
    assert min_train_vectors(PAPER_SPEC, 80) == 2**14
    with pytest.raises(CodecError, match="even head_dim"):
        default_spec(7)


def test_paper_spec_round_trip_on_the_paper_shape():
    """The paper's quantizer once: 14 B per 80-dim vector, 39,424 B per memory (~1830x less than
    dense KV). 2^14 vectors is the fewest the 2x14 multi-index accepts; niter=1 keeps it quick."""
    train = structured(2**14, 80, seed=0, rank=16)
    with pytest.raises(CodecError, match="at least 16384 training vectors"):
        VQCodec.train(train[:-1], PAPER_SPEC)
    vq = VQCodec.train(train, PAPER_SPEC, niter=1)
    assert vq.code_size == 14
    assert bytes_per_memory(vq, PAPER_SHAPE) == 22 * 2 * 8 * 8 * 14 == 39424
    assert PAPER_DENSE_BYTES / bytes_per_memory(RawCodec(), PAPER_SHAPE) == 160
    assert round(PAPER_DENSE_BYTES / bytes_per_memory(vq, PAPER_SHAPE)) == 1829
    held_out = structured(int(np.prod(PAPER_SHAPE[:-1])), 80, seed=1, rank=16)
    mem = torch.from_numpy(held_out).reshape(PAPER_SHAPE)
    back = vq.decode(vq.encode(mem), PAPER_SHAPE, quantizer_hash=vq.quantizer_hash)
    assert back.shape == PAPER_SHAPE and back.dtype == torch.float32
    assert rel_err(mem, back) < 0.25 * guess_err(held_out)


@pytest.mark.parametrize("d, shape, code_size", [(8, TINY_SHAPE, 2), (16, (2, 2, 2, 8, 16), 3)])
def test_vq_beats_a_random_guess_on_structured_data(d, shape, code_size, vq8, vq16):
    vq = vq8 if d == 8 else vq16
    assert vq.spec == default_spec(d) and vq.code_size == code_size
    held_out = structured(5 * int(np.prod(shape[:-1])), d, seed=1)
    mems = torch.from_numpy(held_out).reshape(5, *shape)
    back = vq.decode_batch(vq.encode_batch(mems), shape)
    assert rel_err(mems, back) < 0.25 * guess_err(held_out)


def test_vq_training_is_deterministic_given_the_seed(vq8):
    x = structured(2000, 8, seed=0)
    again = VQCodec.train(x, seed=0, niter=5)
    assert again.quantizer_hash == vq8.quantizer_hash
    assert again.to_bytes() == vq8.to_bytes()
    assert VQCodec.train(x, seed=1, niter=5).quantizer_hash != vq8.quantizer_hash
    mem = torch.from_numpy(structured(16, 8, seed=5)).reshape(TINY_SHAPE)
    assert again.encode(mem) == vq8.encode(mem)


def test_vq_save_load_and_hash(tmp_path, vq8):
    path = tmp_path / "bank" / "quantizer.faiss"
    h = vq8.save(path)
    assert h == vq8.quantizer_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    mem = torch.from_numpy(structured(16, 8, seed=5)).reshape(TINY_SHAPE)
    payload = vq8.encode(mem)
    for loaded in (
        VQCodec.load(path, expected_hash=h),
        make_codec("vq", quantizer=path),
        make_codec("vq", quantizer=vq8.to_bytes(), quantizer_hash=h),
    ):
        assert loaded.quantizer_hash == h
        assert loaded.encode(mem) == payload
        assert torch.equal(loaded.decode(payload, TINY_SHAPE, quantizer_hash=h), vq8.decode(payload, TINY_SHAPE))


def test_vq_missing_quantizer_fails_clearly(tmp_path, vq8):
    h = vq8.quantizer_hash
    payload = vq8.encode(torch.zeros(TINY_SHAPE))
    with pytest.raises(CodecError, match=f"no quantizer loaded.*{h}"):
        make_codec("vq").decode(payload, TINY_SHAPE, quantizer_hash=h)
    with pytest.raises(CodecError, match="no quantizer loaded"):
        VQCodec().encode(torch.zeros(TINY_SHAPE))
    with pytest.raises(CodecError, match=f"quantizer.faiss is missing.*{h}"):
        VQCodec.load(tmp_path / "quantizer.faiss", expected_hash=h)
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(CodecError, match="not a readable faiss index"):
        VQCodec.load(tmp_path / "junk.faiss")


def test_vq_mismatched_quantizer_names_both_hashes(tmp_path, vq8):
    other = VQCodec.train(structured(2000, 8, seed=2), seed=3, niter=5)
    payload = vq8.encode(torch.zeros(TINY_SHAPE))
    a, b = vq8.quantizer_hash, other.quantizer_hash
    with pytest.raises(CodecError, match=f"mismatch.*{a}.*{b}"):
        other.decode(payload, TINY_SHAPE, quantizer_hash=a)
    other.save(tmp_path / "q.faiss")
    with pytest.raises(CodecError, match=f"mismatch.*{a}.*{b}"):
        VQCodec.load(tmp_path / "q.faiss", expected_hash=a)
    with pytest.raises(CodecError, match="codes 8-dim vectors, memory has head_dim 32"):
        vq8.encode(torch.zeros(DEMO_SHAPE))
    with pytest.raises(CodecError, match="uses no quantizer"):
        RawCodec().decode(RawCodec().encode(torch.zeros(TINY_SHAPE)), TINY_SHAPE, quantizer_hash=a)


# ------------------------------------------------------------------------------ every codec


def _codecs(vq8):
    return [RawCodec("bfloat16"), RawCodec("float16"), RawCodec("float32"), Int8Codec(), vq8]


@SETTINGS
@given(shape=memory_shapes(head_dims=(8,)), B=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_batch_equals_one_by_one(vq8, shape, B, seed):
    mems = torch.randn((B, *shape), generator=torch.Generator().manual_seed(seed))
    for codec in _codecs(vq8):
        payloads = codec.encode_batch(mems)
        assert payloads == [codec.encode(m) for m in mems]
        assert all(len(p) == bytes_per_memory(codec, shape) for p in payloads)
        batch = codec.decode_batch(payloads, shape)
        assert batch.shape == (B, *shape)
        assert torch.equal(batch, torch.stack([codec.decode(p, shape) for p in payloads]))
    assert RawCodec().encode_batch(mems[:0]) == []
    assert RawCodec().decode_batch([], shape).shape == (0, *shape)


@SETTINGS
@given(which=st.integers(0, 4), cut=st.integers(-9, 9).filter(bool), at=st.integers(0, 2))
def test_corrupt_payload_says_expected_and_actual_length(vq8, which, cut, at):
    codec = _codecs(vq8)[which]
    mems = torch.randn(3, *TINY_SHAPE, generator=torch.Generator().manual_seed(which))
    payloads = codec.encode_batch(mems)
    expected = len(payloads[at])
    payloads[at] = payloads[at][:cut] if cut < 0 else payloads[at] + bytes(cut)
    actual = expected + cut
    msg = f"corrupt payload for codec {codec.name}: payload {at} is {actual} bytes, expected {expected}"
    with pytest.raises(CodecError, match=msg):
        codec.decode_batch(payloads, TINY_SHAPE)
    with pytest.raises(CodecError, match=f"is {actual} bytes, expected {expected}"):
        codec.decode(payloads[at], TINY_SHAPE)


def test_paper_and_tiny_shapes_round_trip_raw_and_int8():
    for shape in (PAPER_SHAPE, TINY_SHAPE):
        mem = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        raw = make_codec("raw-fp32")
        assert torch.equal(raw.decode(raw.encode(mem), shape), mem)
        int8 = make_codec("int8")
        assert rel_err(mem, int8.decode(int8.encode(mem), shape)) < 1e-3
    n = 22 * 2 * 8 * 8
    assert bytes_per_memory(RawCodec("bfloat16"), PAPER_SHAPE) == 450560  # 440 KiB [paper §2.2]
    assert bytes_per_memory(Int8Codec(), PAPER_SHAPE) == n * (80 + 2)
    assert bytes_per_memory(RawCodec("float32"), TINY_SHAPE) == 16 * 8 * 4


def test_registry_names_and_errors():
    for name in ("raw-bf16", "raw-fp16", "raw-fp32", "int8"):
        assert make_codec(name).name == name
    assert make_codec("raw", dtype=torch.float16).name == "raw-fp16"
    assert make_codec("vq").describe() == {"codec": "vq", "spec": None, "quantizer_hash": None}
    with pytest.raises(CodecError) as err:
        make_codec("zstd")
    assert "'zstd'" in str(err.value) and all(name in str(err.value) for name in CODECS)
    with pytest.raises(CodecError, match="dtype must be bfloat16, float16 or float32"):
        make_codec("raw", dtype="int4")
    with pytest.raises(CodecError, match="bad arguments"):
        make_codec("int8", bits=4)
    with pytest.raises(CodecError, match="memory shape"):
        RawCodec().decode(b"", (2, 8))
    with pytest.raises(CodecError, match="encode takes one memory"):
        RawCodec().encode(torch.zeros(1, *TINY_SHAPE))


def test_vq_rotation_is_undone_in_a_fixed_order_per_element():
    """model/vq.py _transpose_apply runs the transposed batch; every element is still
    ((0 + y0 A0) + y1 A1) + ... in float32 with nothing fused, as the row-by-row loop it replaced."""
    from model.vq import _transpose_apply

    rng = np.random.default_rng(0)
    y = rng.standard_normal((300, 16)).astype(np.float32)
    A = np.linalg.qr(rng.standard_normal((16, 16)))[0].astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    want = np.zeros((300, 16), np.float32)
    for j in range(16):
        want += (y - b)[:, j : j + 1] * A[j]
    assert np.array_equal(_transpose_apply(y, A, b), want)
    assert _transpose_apply(y, A, None).flags.c_contiguous
