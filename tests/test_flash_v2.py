"""The flash_v2 backend (FlashAttention-2 in Triton) against the float64 reference.

On the CPU the kernels run through the Triton interpreter (float32 and float16, small
shapes); the GPU-marked tests add bfloat16, long sequences, wide heads, torch.compile and
CUDA graphs.
"""

import functools

import pytest
import torch

from attention_checks import check_backend, make_qkv, max_err
from fatrain.kernels import get_backend, reference_attention
from fatrain.kernels._dropout import dropout_mask
from fatrain.kernels.flash_v2 import _doc_ranges


def attn():
    return get_backend("flash_v2")


def test_gradients_are_deterministic():
    q, k, v = make_qkv(1, 97, 97, 4, 1, 64, dtype=torch.float16)
    out = attn()(q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout)
    out = attn()(q, k, v, causal=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


ATOMIC_CASES = [  # (shape, causal, window, documents, dropout_p, dtype)
    ((1, 97, 97, 4, 1, 64), True, (-1, -1), False, 0.0, torch.float32),   # MQA: 4 heads add into one dK/dV
    ((2, 33, 70, 4, 2, 80), False, (-1, -1), False, 0.0, torch.float16),  # Nq < Nk, head dim 80, tails
    ((1, 70, 33, 2, 2, 16), True, (-1, -1), False, 0.0, torch.float32),   # Nq > Nk: rows that see no key
    ((2, 40, 40, 4, 2, 16), True, (9, 0), True, 0.3, torch.float32),      # window x documents x dropout x GQA
]


@pytest.mark.parametrize("shape, causal, window, docs, p, dtype", ATOMIC_CASES)
def test_atomic_dq_matches_reference(shape, causal, window, docs, p, dtype):
    """deterministic=False: dQ added with atomics inside the dK/dV pass, same gradients."""
    q, k, v = make_qkv(*shape, dtype=dtype)
    B, Nq, Nk, H = shape[0], shape[1], shape[2], shape[3]
    doc_ids = torch.cumsum(torch.rand(B, Nk) < 0.1, dim=1) if docs else None
    kwargs = dict(causal=causal, window_size=window, doc_ids=doc_ids, dropout_p=p)
    atomic = with_seed(functools.partial(attn(), deterministic=False), SEED)
    mask = dropout_mask(SEED, B, H, Nq, Nk, p, q.device) if p > 0 else None
    check_backend(atomic, q, k, v, dropout_mask=mask, **kwargs)
    # Against the deterministic pass: dK and dV are the same computation, dQ differs in rounding only.
    dout = torch.randn(q.shape, dtype=dtype)
    grads = {}
    for det in (True, False):
        out = attn()(q, k, v, dropout_seed=SEED, **dict(kwargs, deterministic=det))
        grads[det] = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(grads[True][1], grads[False][1]) and torch.equal(grads[True][2], grads[False][2])
    assert max_err(grads[True][0], grads[False][0]) < (1e-5 if dtype == torch.float32 else 2e-2)


TMA_CASES = [  # (shape, causal, window, documents, dropout_p, dtype, strided)
    ((1, 97, 97, 4, 1, 64), True, (-1, -1), False, 0.0, torch.float32, False),   # MQA, tails of 97
    ((2, 33, 70, 4, 2, 80), False, (-1, -1), False, 0.0, torch.float16, False),  # head dim 80: zero fill past d
    ((1, 70, 33, 2, 2, 16), True, (-1, -1), False, 0.0, torch.float32, True),    # strided k, v (descriptors), q (not)
    ((2, 40, 40, 4, 2, 16), True, (9, 0), True, 0.3, torch.float32, False),      # window x documents x dropout x GQA
    ((1, 52, 60, 2, 2, 32), True, (-1, -1), False, 0.0, torch.float16, False),   # Nq % 4 == 0: LSE, Delta rows too
]


@pytest.fixture
def tensor_descriptors(monkeypatch):
    """The kernels load tiles through tensor descriptors (the H100 path) in the interpreter too."""
    from fatrain.kernels import _tma
    monkeypatch.setattr(_tma, "MODE", "1")
    return _tma


@pytest.mark.parametrize("shape, causal, window, docs, p, dtype, strided", TMA_CASES)
def test_tensor_descriptor_loads_match_reference_and_pointer_loads(tensor_descriptors, monkeypatch, shape, causal,
                                                                    window, docs, p, dtype, strided):
    q, k, v = make_qkv(*shape, dtype=dtype, strided=strided)
    assert tensor_descriptors.use_tma(k, v)
    B, Nq, Nk, H = shape[0], shape[1], shape[2], shape[3]
    doc_ids = torch.cumsum(torch.rand(B, Nk) < 0.1, dim=1) if docs else None
    kwargs = dict(causal=causal, window_size=window, doc_ids=doc_ids, dropout_p=p)
    mask = dropout_mask(SEED, B, H, Nq, Nk, p, q.device) if p > 0 else None
    check_backend(with_seed(attn(), SEED), q, k, v, dropout_mask=mask, **kwargs)
    # The same arithmetic on the same tiles as the pointer loads; the interpreter's matmuls
    # (numpy) may sum a transposed tile in another order, so equal up to rounding.
    dout = torch.randn(q.shape, dtype=dtype)
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setattr(tensor_descriptors, "MODE", mode)
        out, lse = attn()(q, k, v, dropout_seed=SEED, return_lse=True, **kwargs)
        results[mode] = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(results["1"], results["0"]):
        assert max_err(a, b) <= (1e-5 if dtype == torch.float32 else 4e-3) * max(1.0, b.abs().max().item())


def test_tensor_descriptors_only_where_the_copy_engine_can_read(tensor_descriptors):
    use = tensor_descriptors.use_tma
    x = torch.randn(2, 17, 4, 64)
    assert use(x) and use(x.transpose(1, 2).contiguous().transpose(1, 2))  # (B, H, N, D) storage
    assert not use(x[..., ::2])                           # d not contiguous
    assert not use(torch.randn(2, 17, 4, 65)[..., 1:])    # start 4 bytes past an aligned address
    assert not use(torch.randn(1, 17, 1, 20, dtype=torch.float16))  # rows 40 bytes apart
    assert not use(torch.randn(1, 1, 4, 64).expand(1, 17, 4, 64))  # rows 0 bytes apart (an expanded grad)
    assert use(torch.randn(1, 17, 1, 24, dtype=torch.float16))      # rows 48 bytes apart


def test_dkdv_pass_reads_lse_and_delta_rows_by_descriptor_only_when_aligned(tensor_descriptors):
    use = tensor_descriptors.use_tma_stats
    assert use(40) and use(4)
    assert not use(37) and not use(41)  # rows 148 / 164 bytes apart: not 16-byte aligned


def test_tensor_descriptors_are_off_on_the_cpu_by_default():
    from fatrain.kernels import _tma
    assert _tma.MODE in ("auto", "0", "1")
    if _tma.MODE == "auto":
        assert not _tma.use_tma(torch.randn(1, 16, 1, 16))


@pytest.fixture
def launches(monkeypatch):
    """The (kernel name, BLOCK_M, BLOCK_N) of every flash_v2 launch, in order."""
    from fatrain.kernels import flash_v2
    real = flash_v2.wrap_triton
    seen = []

    def wrap_triton(kernel):
        def launch(grid):
            def run(*args, **kwargs):
                seen.append((kernel.fn.__name__, kwargs["BLOCK_M"], kwargs.get("BLOCK_N")))
                return real(kernel)[grid](*args, **kwargs)
            return run
        return type("Launcher", (), {"__getitem__": lambda self, grid: launch(grid)})()

    monkeypatch.setattr(flash_v2, "wrap_triton", wrap_triton)
    return seen


def test_configs_list_each_pass_with_the_default_first():
    from fatrain.kernels import flash_v2
    assert flash_v2.PASSES == ("fwd", "dkdv", "dkdv_atomic", "dq")
    for name in flash_v2.PASSES:
        for head_dim in (64, 256):
            configs = flash_v2.configs(name, head_dim=head_dim)
            assert configs and all(set(c) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg"}
                                   for c in configs)
    assert flash_v2.configs("fwd")[0] == dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=None)
    assert flash_v2.configs("fwd")[1]["maxnreg"] == 128
    assert flash_v2.configs("dkdv") == flash_v2.configs("dkdv_atomic")
    assert flash_v2.configs("dq", head_dim=256) != flash_v2.configs("dq", head_dim=128)
    with pytest.raises(ValueError, match="unknown flash_v2 pass 'bwd'"):
        flash_v2.configs("bwd")


def test_pin_launches_that_config_nests_and_restores(launches):
    from fatrain.kernels import flash_v2
    q, k, v = make_qkv(1, 70, 70, 2, 1, 16, dtype=torch.float32)
    attn()(q, k, v, causal=True)
    default = launches[-1]
    assert default == ("_fwd_kernel", 32, 16)  # the interpreter's config
    with flash_v2.pin("fwd", {"BLOCK_M": 16, "BLOCK_N": 32}) as pinned:
        assert pinned["num_warps"] == flash_v2.configs("fwd")[0]["num_warps"]  # filled from the default
        check_backend(attn(), q, k, v, causal=True)
        assert ("_fwd_kernel", 16, 32) in launches and ("_fwd_kernel", 32, 16) not in launches[1:]
        with flash_v2.pin("fwd", flash_v2.configs("fwd")[-1]):  # (64, 64, 4, 3)
            attn()(q, k, v, causal=True)
            assert launches[-1] == ("_fwd_kernel", 64, 64)
            with flash_v2.pin("fwd", None):  # the default again
                attn()(q, k, v, causal=True)
                assert launches[-1] == default
        attn()(q, k, v, causal=True)
        assert launches[-1] == ("_fwd_kernel", 16, 32)
        with flash_v2.pin("fwd", {"BLOCK_M": 64, "BLOCK_N": 16}, head_dim=256):  # the other head-dim class
            attn()(q, k, v, causal=True)
            assert launches[-1] == ("_fwd_kernel", 16, 32)
    attn()(q, k, v, causal=True)
    assert launches[-1] == default and not flash_v2._PINNED


@pytest.mark.parametrize("name, deterministic", [("dq", True), ("dkdv", True), ("dkdv_atomic", False)])
def test_pin_backward_passes_match_reference(launches, name, deterministic):
    from fatrain.kernels import flash_v2
    q, k, v = make_qkv(1, 50, 83, 4, 2, 16, dtype=torch.float32)
    kernel = "_bwd_dq" if name == "dq" else "_bwd_dkdv"
    with flash_v2.pin(name, {"BLOCK_M": 16, "BLOCK_N": 64}):
        check_backend(functools.partial(attn(), deterministic=deterministic), q, k, v, causal=True,
                      window_size=(20, 0))
    assert (kernel, 16, 64) in launches


@pytest.mark.parametrize("config, match", [
    ({"BLOCK_M": 16}, "a flash_v2 config is a dict with BLOCK_M and BLOCK_N"),
    ({"BLOCK_M": 16, "BLOCK_N": 32, "warps": 4}, "a flash_v2 config is a dict"),
    ({"BLOCK_M": 48, "BLOCK_N": 32}, "BLOCK_M must be a power of two >= 16"),
    ({"BLOCK_M": 16, "BLOCK_N": 8}, "BLOCK_N must be a power of two >= 16"),
])
def test_pin_validates_the_config(config, match):
    from fatrain.kernels import flash_v2
    with pytest.raises(ValueError, match=match):
        with flash_v2.pin("fwd", config):
            pass
    assert not flash_v2._PINNED


def test_autotune_picks_are_empty_in_the_interpreter():
    from fatrain.kernels import flash_v2, run_info
    assert flash_v2.autotune_picks() == [] and run_info("flash_v2") == []


def test_deterministic_is_validated():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        attn()(q, k, v, deterministic=1)


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 33, 33, 2, 1, 16, dtype=torch.float32)
    fn = attn()  # looked up outside: torch.compile traces the kernel call, not the registry
    compiled = torch.compile(lambda q, k, v: fn(q, k, v, causal=True), fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, attn()(q, k, v, causal=True), rtol=0, atol=0)
    dq, = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(dq).all()


def test_autocast_casts_inputs():
    q, k, v = make_qkv(1, 17, 17, 2, 2, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = attn()(q, k, v, causal=True)
    assert out.dtype == torch.float16
    ref = reference_attention(q, k, v, causal=True)
    assert max_err(out, ref) < 1e-2
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


SEED = 1234


def with_seed(attn, seed):
    """attn with a fixed dropout seed that drops the reference's dropout_mask argument."""
    def call(q, k, v, dropout_mask=None, **kwargs):
        return attn(q, k, v, dropout_seed=seed, **kwargs)
    return call


def test_document_ranges_clip_packed_rows_only():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3], [0, 1, 0, 1, 1, 1, 2, 2]])
    ranges = _doc_ranges(ids)
    assert ranges.dtype == torch.int32 and ranges.shape == (2, 2, 8)
    assert ranges[0].tolist() == [[0, 0, 2, 2, 2, 5, 6, 6], [2, 2, 5, 5, 5, 6, 8, 8]]
    assert ranges[1].tolist() == [[0] * 8, [8] * 8]  # ids decrease somewhere: no clipping


def _packed_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over poisoned rows
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), None], ids=["m16n16", "m32n16", "default"])
@pytest.mark.parametrize("causal", [False, True])
def test_document_blocks_between_documents_are_skipped(blocks, causal):
    # Documents of 32 tokens aligned with the blocks. NaN in the first document's K and V
    # (forward, dQ) or Q (dK/dV) reaches every block pair a pass visits (0 * NaN = NaN, even
    # where masked), so finite results elsewhere prove those pairs were skipped in all passes.
    N, first = 96, slice(0, 32)
    kwargs = dict(causal=causal, doc_ids=_packed_ids([32, 32, 32]))
    if blocks is not None:
        kwargs.update(block_m=blocks[0], block_n=blocks[1])
    q, k, v = make_qkv(1, N, N, 2, 2, 16, dtype=torch.float32)
    clean = attn()(q, k, v, **kwargs)
    rest = slice(32, N)
    # Forward and dQ: poisoned keys.
    k_bad, v_bad = k.detach().clone(), v.detach().clone()
    k_bad[:, first], v_bad[:, first] = float("nan"), float("nan")
    out = attn()(q, k_bad, v_bad, **kwargs)
    assert torch.isnan(out[:, first]).any()  # the visited pairs do see the poison
    assert torch.equal(out[:, rest], clean[:, rest])
    dq, = torch.autograd.grad(out[:, rest].sum(), (q,))
    assert torch.isfinite(dq[:, rest]).all()
    # dK/dV: poisoned queries.
    q_bad = q.detach().clone()
    q_bad[:, first] = float("nan")
    out = attn()(q_bad, k, v, **kwargs)
    assert torch.equal(out[:, rest], clean[:, rest])
    dk, dv = torch.autograd.grad(out[:, rest].sum(), (k, v))
    assert torch.isfinite(dk[:, rest]).all() and torch.isfinite(dv[:, rest]).all()


# (block_m, block_n): a program's owned tile larger and smaller than the looped one.
FIXED_BLOCKS = [(64, 16), (16, 32)]


@pytest.mark.parametrize("blocks", FIXED_BLOCKS, ids=lambda b: f"m{b[0]}n{b[1]}")
@pytest.mark.parametrize("shape, causal, window, docs", [
    ((1, 97, 75, 4, 2, 16), True, (-1, -1), False),
    ((2, 50, 83, 2, 1, 16), False, (20, 5), True),
])
def test_fixed_block_sizes_match_reference(shape, causal, window, docs, blocks):
    q, k, v = make_qkv(*shape, dtype=torch.float32)
    doc_ids = torch.cumsum(torch.rand(shape[0], shape[2]) < 0.1, dim=1) if docs else None
    fixed = functools.partial(attn(), block_m=blocks[0], block_n=blocks[1])
    check_backend(fixed, q, k, v, causal=causal, window_size=window, doc_ids=doc_ids)


@pytest.mark.parametrize("stages_that_fit, raises", [(1, False), (0, True)])
def test_fixed_tiles_that_do_not_fit_retry_with_fewer_stages(monkeypatch, stages_that_fit, raises):
    import triton

    from fatrain.kernels import flash_v2 as module
    real = module.wrap_triton
    tried = []

    def wrap_triton(kernel):  # a GPU whose shared memory holds only `stages_that_fit` stages
        def launch(grid):
            def run(*args, **kwargs):
                tried.append(kwargs.get("num_stages"))
                if kwargs.get("num_stages", 0) > stages_that_fit:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return real(kernel)[grid](*args, **kwargs)
            return run
        return type("Launcher", (), {"__getitem__": lambda self, grid: launch(grid)})()

    monkeypatch.setattr(module, "wrap_triton", wrap_triton)
    q, k, v = (t.detach() for t in make_qkv(1, 20, 20, 2, 2, 16, dtype=torch.float32))
    call = functools.partial(attn(), q, k, v, block_m=32, block_n=16)
    if raises:
        with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"block_m=32, block_n=16 need more"):
            call()
    else:
        with pytest.warns(RuntimeWarning, match="retrying with") as warned:
            torch.testing.assert_close(call(), reference_attention(q, k, v).float(), atol=1e-5, rtol=1e-5)
        assert tried == [3, 2, 1] and len(warned) == 2


@pytest.mark.parametrize("blocks, match", [
    ((48, 32), r"block_m must be a power of two in 16..256"),
    ((64, 512), r"block_n must be a power of two in 16..256"),
    ((64, 8), r"block_n must be a power of two in 16..256"),
    ((64, None), r"block_m and block_n must be set together"),
    ((64.0, 32), r"block_m must be a power of two"),
])
def test_fixed_block_sizes_are_validated(blocks, match):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=match):
        attn()(q, q, q, block_m=blocks[0], block_n=blocks[1])


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(1, 8, 2, 8), k=torch.randn(1, 8, 2, 8), v=torch.randn(1, 8, 2, 8)),
     r"head_dim 8 is not supported by flash_v2 \(supported: 16..256\)"),
    (dict(q=torch.randn(1, 8, 2, 320), k=torch.randn(1, 8, 2, 320), v=torch.randn(1, 8, 2, 320)),
     r"head_dim 320 is not supported by flash_v2"),
    (dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), "multiple of the number of key/value heads"),
    (dict(q=torch.randn(1, 8, 2, 16, dtype=torch.float64), k=torch.randn(1, 8, 2, 16, dtype=torch.float64),
          v=torch.randn(1, 8, 2, 16, dtype=torch.float64)), "float64 is not supported by flash_v2"),
    (dict(v=torch.randn(1, 8, 2, 16, dtype=torch.float16)), "share one dtype"),
    (dict(q=torch.randn(8, 2, 16)), "q must have 4 dims"),
    (dict(k=torch.randn(1, 9, 2, 16)), "k and v must have the same shape"),
    (dict(k=torch.randn(1, 8, 2, 16, device="meta")), "one device"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(dropout_p=1.5), "dropout_p"),
    (dict(dropout_p=0.1, dropout_seed=-2), "dropout_seed"),
    (dict(dropout_seed=2.5), "dropout_seed"),
    (dict(window_size=(-3, 0)), "window_size"),
    (dict(doc_ids=torch.zeros(1, 7, dtype=torch.long)), "doc_ids must be an integer tensor of shape"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(q=torch.randn(1, 8, 2, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        attn()(q, k, v, **args)


def test_rows_past_32_bit_offsets_are_refused_with_one_line():
    # 2^21 rows of 1024 elements (8 heads of 128) pass 2^31 within one sequence: refused before
    # anything is allocated or launched (meta tensors: no memory); one row fewer fits.
    from fatrain.kernels.flash_v2 import flash_v2_attention, flash_v2_varlen_attention

    big = torch.empty(1, 2**21 + 1, 8, 128, device="meta", dtype=torch.bfloat16)
    small = torch.empty(1, 64, 8, 128, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"q has 2097153 rows of 1024 elements: .* at most 2097152 rows"):
        flash_v2_attention(big, small, small)
    with pytest.raises(ValueError, match=r"^k has 2097153 rows"):
        flash_v2_attention(small, big, big)
    # varlen reads cu_seqlens, so its rows are one row expanded (stride 0; the outputs' is 1024)
    packed = torch.empty(1, 8, 128, dtype=torch.bfloat16).expand(2**21 + 1, 8, 128)
    cu = torch.tensor([0, 2**21 + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q has 2097153 rows of 1024 elements"):
        flash_v2_varlen_attention(packed, packed, packed, cu, cu, 2**21 + 1, 2**21 + 1)


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fwd", "dkdv", "dkdv_atomic", "dq"])
def test_gpu_every_autotune_config_is_exact(name):
    """Each configuration the autotuner may pick, pinned in turn (the other passes autotuned),
    at d=64 and d=128, causal, rows a multiple of 4 (the dK/dV pass reads LSE and Delta through
    descriptors from 32-row steps) and not. dkdv_atomic: deterministic=False, whose dK/dV pass
    also reduces dQ into float32 through the copy engine."""
    import triton

    from fatrain.kernels import flash_v2
    fn = functools.partial(attn(), deterministic=name != "dkdv_atomic")
    tested = 0
    for shape in [(2, 1000, 1000, 4, 2, 64), (1, 257, 257, 2, 2, 128)]:
        q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")
        configs = flash_v2.configs(name, head_dim=shape[-1])
        for config in configs:
            try:
                with flash_v2.pin(name, config, head_dim=shape[-1]):
                    check_backend(fn, q, k, v, causal=True)
            except triton.runtime.errors.OutOfResources:
                # the autotuner skips a config that needs more shared memory than the GPU has
                # (dQ's 128 x 128 with 3 stages at d=128); one that fits must be exact
                assert shape[-1] == 128, config
                continue
            tested += 1
    assert tested >= len(configs)


@pytest.mark.gpu
def test_gpu_long_sequence_and_strides():
    q, k, v = make_qkv(1, 8192, 8192, 2, 1, 64, dtype=torch.bfloat16, device="cuda", strided=True)
    check_backend(attn(), q, k, v, causal=True)


@pytest.mark.gpu
def test_gpu_deterministic_and_compiled_and_graphed():
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(2, 1000, 8, 128, dtype=torch.bfloat16, device="cuda")
    fn = attn()

    def step(q, k, v):
        out = fn(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    eager = step(q, k, v)
    again = step(q, k, v)
    for a, b in zip(eager, again):
        assert torch.equal(a, b)
    # torch.compile traces the forward (and, through AOTAutograd, the backward) with fullgraph.
    compiled_fn = torch.compile(lambda q, k, v: fn(q, k, v, causal=True), fullgraph=True)
    out = compiled_fn(q, k, v)
    compiled = (out, *torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(eager, compiled):  # the compiled graph may autotune to other blocks
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # CUDA graph capture after warm-up (autotuning done above).
    static_q, static_k, static_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(static_q, static_k, static_v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = step(static_q, static_k, static_v)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, causal, dropout_p", [((2, 2048, 2048, 8, 2, 128), True, 0.0),
                                                      ((2, 1000, 1100, 12, 12, 64), False, 0.1),
                                                      ((1, 333, 333, 3, 1, 80), True, 0.0)],
                         ids=["d128-causal-gqa", "d64-tails-dropout", "d80-mqa-tails"])
def test_gpu_atomic_dq(shape, causal, dropout_p):
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")
    B, Nq, Nk, H = shape[:4]
    fn = with_seed(functools.partial(attn(), deterministic=False), SEED)
    mask = dropout_mask(SEED, B, H, Nq, Nk, dropout_p, q.device) if dropout_p else None
    check_backend(fn, q, k, v, causal=causal, dropout_p=dropout_p, dropout_mask=mask)


@pytest.mark.gpu
def test_gpu_atomic_dq_under_torch_compile():
    q, k, v = make_qkv(1, 512, 512, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(1, 512, 4, 64, dtype=torch.bfloat16, device="cuda")
    fn = functools.partial(attn(), deterministic=False)
    compiled = torch.compile(lambda q, k, v: fn(q, k, v, causal=True), fullgraph=True)
    out = compiled(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = attn()(q, k, v, causal=True)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    assert max_err(out, ref) == 0
    for a, b in zip(got, want):
        assert max_err(a, b) < 2e-2


@pytest.mark.gpu
def test_gpu_autocast():
    q, k, v = make_qkv(1, 256, 256, 4, 2, 64, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn()(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    assert max_err(out, reference_attention(q, k, v, causal=True)) < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("block_m, block_n", [(64, 32), (128, 64), (256, 128)])
def test_gpu_fixed_block_sizes_of_the_ablation(block_m, block_n):
    # The corners of configs/experiment/block_sizes.yaml's grid (64..256 x 32..128) at GPT-2
    # small's head dim, bf16, causal: three of the nine, to keep the GPU test call short.
    q, k, v = make_qkv(1, 1000, 1000, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    try:
        check_backend(functools.partial(attn(), block_m=block_m, block_n=block_n), q, k, v, causal=True)
    except ValueError as err:  # a tile this GPU cannot hold even with one stage: say which
        if "on-chip memory" not in str(err):
            raise
        pytest.skip(str(err))


@pytest.mark.gpu
def test_gpu_compiled_with_documents_and_dropout():
    # The triton_op path with every feature on: _doc_ranges' device ops, the seed and p as
    # kernel arguments (fp64 under torch.compile, cast in the kernels), fixed tiles.
    q, k, v = make_qkv(2, 1000, 1000, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    doc_ids = torch.cumsum(torch.rand(2, 1000, device="cuda") < 0.004, dim=1)
    dout = torch.randn(2, 1000, 4, 64, dtype=torch.bfloat16, device="cuda")
    fn = attn()
    kwargs = dict(causal=True, doc_ids=doc_ids, dropout_p=0.1, dropout_seed=SEED, block_m=128, block_n=64)
    eager = fn(q, k, v, **kwargs)
    compiled_fn = torch.compile(lambda q, k, v: fn(q, k, v, **kwargs), fullgraph=True)
    out = compiled_fn(q, k, v)
    assert torch.equal(out, eager)  # same tiles, same mask: the same arithmetic
    # AOTAutograd may hand the backward other strides of dout: values agree, not bits.
    for a, b in zip(torch.autograd.grad(eager, (q, k, v), dout), torch.autograd.grad(out, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
