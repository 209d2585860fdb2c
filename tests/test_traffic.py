"""flash_v1's HBM-traffic model (``fatrain/bench/traffic.py``): how its terms scale, one
block pair counted by hand, and windows."""

from fatrain.bench.traffic import _visited_rows, flash_v1_hbm_traffic

# 4096 bytes = 1024 float32 words: B_c = ceil(1024 / 4d) <= 16 for d >= 16, so every block is 16 x 16.
SMALL_SRAM = 4096


def test_traffic_model_scaling():
    kw = dict(batch=2, nheads=4, head_dim=64, dtype_bytes=2, causal=False)
    m = 4 * 4 * 64 * 64  # bytes: M = 4096 words, B_c = 16
    base = flash_v1_hbm_traffic(seqlen_q=4096, seqlen_k=4096, sram_bytes=m, **kw)
    long = flash_v1_hbm_traffic(seqlen_q=8192, seqlen_k=8192, sram_bytes=m, **kw)
    # Doubling N quadruples the N^2 term exactly and the total nearly (the linear terms only double).
    assert long.forward_inner == 4 * base.forward_inner and long.backward_inner == 4 * base.backward_inner
    assert 3.9 < long.forward / base.forward <= 4.0 and 3.9 < long.backward / base.backward <= 4.0
    # Doubling M doubles B_c, halving T_c and with it the N^2 term.
    big = flash_v1_hbm_traffic(seqlen_q=4096, seqlen_k=4096, sram_bytes=2 * m, **kw)
    assert big.block_n == 2 * base.block_n
    assert 2 * big.forward_inner == base.forward_inner and 2 * big.backward_inner == base.backward_inner
    # Causal skips the blocks above the diagonal: a little over half the inner traffic.
    causal = flash_v1_hbm_traffic(seqlen_q=4096, seqlen_k=4096, sram_bytes=m, **{**kw, "causal": True})
    assert 0.5 < causal.forward_inner / base.forward_inner < 0.52


def test_traffic_model_counts_one_pair_by_hand():
    # One K/V block and one Q block of 16 rows, d = 16, fp16: every load and store counted once.
    t = flash_v1_hbm_traffic(1, 1, 16, 16, 16, 2, SMALL_SRAM, causal=False)
    n = d = 16
    fwd = 2 * 2 * n * d + n * (2 * d + 8 * d + 16) + (4 * n * d + 8 * n) + (4 + 2) * n * d
    bwd = 4 * 2 * n * d + n * (3 * 2 * d + 8 * d + 8) + (8 + 2) * n * d
    assert (t.forward, t.backward) == (fwd, bwd)


def test_traffic_model_window_grows_linearly():
    kw = dict(batch=1, nheads=1, head_dim=64, dtype_bytes=2, sram_bytes=4 * 4 * 64 * 64, causal=True)
    full = [flash_v1_hbm_traffic(seqlen_q=n, seqlen_k=n, **kw).forward_inner for n in (4096, 8192)]
    window = [flash_v1_hbm_traffic(seqlen_q=n, seqlen_k=n, window_size=(256, 0), **kw).forward_inner
              for n in (4096, 8192)]
    assert full[1] / full[0] > 3.9  # N^2
    assert 1.95 < window[1] / window[0] < 2.05  # N x window (the first blocks see fewer rows)
    assert window[0] < full[0] / 6
    # The default (no window) is the old model.
    assert flash_v1_hbm_traffic(seqlen_q=4096, seqlen_k=4096, **kw).forward_inner == full[0]


def test_visited_rows_without_a_mask_are_every_row_per_kv_block():
    assert _visited_rows(100, 70, 16, 32, -1, -1) == 3 * 100
    # causal, Nq = Nk = 64, 16 x 16 blocks: K/V block j is seen by the Q blocks j..3
    assert _visited_rows(64, 64, 16, 16, -1, 0) == 16 * (4 + 3 + 2 + 1)
