"""flash_decode (split-K decoding) against the float64 reference, on small shapes.

Each sequence b is compared with the reference run on its own valid prefix
k_cache[b, :cache_seqlens[b]]; the cache beyond that prefix is poisoned with NaN, so a
read past a sequence's length fails the test, and so does an unwritten output (NaN).
"""

import pytest
import torch

from attention_checks import _FLOOR, OUT_FACTOR, max_err
from fatrain.kernels import MASKED_ROW_LSE, reference_attention
from fatrain.kernels.decode import flash_decode, nk_bucket, pick_num_splits


def _rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype)


def make_cache(B, Nq, Nk_max, H, Hkv, D, dtype, lengths, seed=0):
    """q, and caches whose positions past each sequence's length hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    q = _rand(gen, B, Nq, H, D, dtype=dtype)
    k = _rand(gen, B, Nk_max, Hkv, D, dtype=dtype)
    v = _rand(gen, B, Nk_max, Hkv, D, dtype=dtype)
    for b, n in enumerate(lengths):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return q, k, v


def check_decode(q, k, v, lengths, *, pass_lengths=True, **kwargs):
    """flash_decode's output and logsumexp per sequence within OUT_FACTOR x PyTorch's own error."""
    seqlens = torch.tensor(lengths, dtype=torch.int32) if pass_lengths else None
    out, lse = flash_decode(q, k, v, cache_seqlens=seqlens, return_lse=True, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    ref_kwargs = {key: kwargs[key] for key in ("causal", "window_size", "softmax_scale") if key in kwargs}
    floor = _FLOOR[q.dtype]
    for b, n in enumerate(lengths):
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]
        ref, ref_lse = reference_attention(qb, kb, vb, upcast=True, return_lse=True, **ref_kwargs)
        same, same_lse = reference_attention(qb, kb, vb, upcast=False, return_lse=True, **ref_kwargs)
        err, torch_err = max_err(out[b:b + 1], ref), max_err(same, ref)
        assert err <= OUT_FACTOR * torch_err + floor, f"sequence {b}: output error {err:.3e} vs torch {torch_err:.3e}"
        lse_err, torch_lse_err = max_err(lse[b:b + 1], ref_lse), max_err(same_lse, ref_lse)
        assert lse_err <= OUT_FACTOR * torch_lse_err + max(floor, _FLOOR[torch.float32]), \
            f"sequence {b}: lse error {lse_err:.3e}"
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (4, 1)])  # GQA ratios 1, 4 and H (MQA)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gqa_splits_and_per_sequence_lengths(dtype, H, Hkv, num_splits):
    lengths = [37, 1, 64]
    q, k, v = make_cache(3, 1, 70, H, Hkv, 32, dtype, lengths, seed=H * 10 + Hkv + num_splits)
    check_decode(q, k, v, lengths, num_splits=num_splits)


@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (9, 3)), (True, (16, -1)),
                                                (False, (-1, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_and_windows_with_several_queries(causal, window_size, dtype):
    lengths = [97, 5, 60]  # a sequence shorter than the window, one with fewer keys than rows see
    q, k, v = make_cache(3, 3, 100, 8, 2, 16, dtype, lengths, seed=7)
    check_decode(q, k, v, lengths, causal=causal, window_size=window_size, num_splits=4)


def test_more_queries_than_one_m_block_and_than_keys():
    # 4 query heads per group x 20 queries = 80 (query, head) rows: two M blocks of 64. With 5
    # keys and causal, the first 15 queries see nothing: zeros and MASKED_ROW_LSE.
    lengths = [5, 33]
    q, k, v = make_cache(2, 20, 40, 4, 1, 16, torch.float32, lengths, seed=3)
    out, lse = check_decode(q, k, v, lengths, causal=True, num_splits=2)
    assert torch.equal(out[0, :15], torch.zeros_like(out[0, :15]))
    assert torch.all(lse[0, :, :15] == MASKED_ROW_LSE)


def test_whole_cache_without_lengths_and_automatic_splits():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (_rand(gen, 2, 2, 4, 64, dtype=torch.float32), _rand(gen, 2, 517, 2, 64, dtype=torch.float32),
               _rand(gen, 2, 517, 2, 64, dtype=torch.float32))
    check_decode(q, k, v, [517, 517], pass_lengths=False, causal=True, softmax_scale=0.3)


def test_strided_caches_are_read_in_place():
    gen = torch.Generator().manual_seed(5)
    q = _rand(gen, 2, 1, 4, 64, dtype=torch.float32)[..., ::2]  # headdim 32, stride 2
    k = _rand(gen, 2, 2, 50, 32, dtype=torch.float32).transpose(1, 2)  # (B, Nk, Hkv, D) view
    v = _rand(gen, 2, 50, 4, 32, dtype=torch.float32)[:, :, ::2]
    check_decode(q, k, v, [50, 23], num_splits=2)


def test_split_count_is_constant_within_a_length_bucket():
    assert nk_bucket(1025) == nk_bucket(2048) == 2048 and nk_bucket(3) == 16
    picks = {pick_num_splits(1, 8, 1, nk, 132) for nk in range(16385, 32769, 997)}
    assert len(picks) == 1
    assert pick_num_splits(1, 8, 1, 131072, 132) == 33  # 2 waves of 132 SMs over 8 programs
    assert pick_num_splits(32, 8, 1, 131072, 132) == 1  # 256 programs fill the GPU already
    assert pick_num_splits(1, 8, 1, 300, 132) == 2  # no split under 256 keys of the bucket


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_splits=-1), "num_splits must be an int in 0..128"),
    (dict(cache_seqlens=torch.tensor([1.0, 2.0])), "cache_seqlens must be an int or an integer tensor"),
    (dict(cache_seqlens=torch.tensor([1, 2, 3])), r"shape \(batch,\) = \(2,\)"),
    (dict(window_size=(-2, 0)), "window_size entries must be >= -1"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    q, k, v = make_cache(2, 1, 8, 2, 1, 16, torch.float32, [8, 8])
    with pytest.raises(ValueError, match=message):
        flash_decode(q, k, v, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nk", [1000, 16384, 70001])
def test_gpu_decode_matches_reference(dtype, nk):
    torch.manual_seed(0)
    B, H, Hkv, D = 4, 32, 8, 128
    lengths = [nk, nk // 3, 17, nk - 1]
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype)
    k = torch.randn(B, nk, Hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, nk, Hkv, D, device="cuda", dtype=dtype)
    seqlens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    for causal, window in ((True, (-1, -1)), (False, (4096, 0))):
        out = flash_decode(q, k, v, cache_seqlens=seqlens, causal=causal, window_size=window)
        for b, n in enumerate(lengths):
            ref = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal,
                                      window_size=window)
            same = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal,
                                       window_size=window, upcast=False)
            assert max_err(out[b:b + 1], ref) <= OUT_FACTOR * max_err(same, ref) + _FLOOR[dtype]


def test_decode_bench_smoke_writes_a_row_per_impl_and_shape(tmp_path):
    import csv
    import json

    from hydra import compose, initialize_config_module

    from fatrain.bench.decode import run_decode_bench
    from fatrain.config import register_configs

    register_configs()
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name="bench", overrides=[
            "bench=decode", "device=cpu", "cpu_reps=1", "decode.impls=[flash_v2,sdpa_math]",
            "decode.cache_lens=[33,64]", "decode.batches=[2]", "decode.nheads=4", "decode.nheads_k=2",
            "decode.headdim=16", "decode.dtype=fp32", "decode.copy_mib=1"])
    path = run_decode_bench(cfg, str(tmp_path), log=lambda line: None)
    rows = list(csv.DictReader(open(path)))
    assert [(r["impl"], r["cache_len"]) for r in rows] == [("flash_v2", "33"), ("sdpa_math", "33"),
                                                          ("flash_v2", "64"), ("sdpa_math", "64")]
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 and float(r["kv_gb_per_s"]) > 0 for r in rows), rows
    row = rows[0]
    # kv bytes = 2 (K and V) x batch 2 x 33 keys x 2 heads x 16 dims x 4 bytes
    expected = 2 * 2 * 33 * 2 * 16 * 4 / (float(row["ms"]) * 1e-3) / 1e9
    assert abs(float(row["kv_gb_per_s"]) / expected - 1) < 1e-2
    assert abs(float(row["fraction_of_copy"]) * float(row["copy_gb_per_s"]) / float(row["kv_gb_per_s"]) - 1) < 1e-2
    jsonl = [json.loads(line) for line in open(tmp_path / "decode_bench.jsonl")]
    assert len(jsonl) == 4 and jsonl[0]["impl"] == "flash_v2"


def test_decode_bench_bad_setting_names_it(tmp_path):
    from hydra import compose, initialize_config_module

    from fatrain.bench.decode import run_decode_bench
    from fatrain.config import register_configs

    register_configs()
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name="bench", overrides=["bench=decode", "device=cpu", "decode.nheads_k=5"])
    with pytest.raises(ValueError, match="decode.nheads=32 must be a multiple of decode.nheads_k=5"):
        run_decode_bench(cfg, str(tmp_path))
