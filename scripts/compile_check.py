"""Compile fatrain's Triton kernels for an H100 (sm_90a) on a machine without a GPU.

    TRITON_INTERPRET=0 python scripts/compile_check.py [--only NAME ...]

Catches compile errors (API gaps between Triton versions, type errors) before a GPU run,
and prints what ``ptxas -v`` reports per kernel variant: registers per
thread, spill bytes and shared memory. Run it under the Triton version of the GPU machine
(3.6 there) with e.g. ``pip install --target /tmp/t36 triton==3.6.0`` and
``PYTHONPATH=/tmp/t36``. Kernel arguments are typed from their names (pointers bf16 or
fp32/int32 as the launchers pass them, floats fp32, the rest i32).
"""

import argparse
import inspect
import os
import re
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fatrain  # noqa: E402,F401
from fatrain.kernels import _dropout, decode, flash_v1, flash_v2  # noqa: E402

FLOATS = {"qk_scale", "sm_scale", "softmax_scale", "dropout_p", "dropout_scale", "softcap", "softcap_in",
          "softcap_out"}
FP32_POINTERS = {"LSE", "LSE2", "Delta", "L", "M", "O_acc", "DQ_acc", "SLOPES", "SINKS", "ALIBI"}
INT_POINTERS = {"DOC", "DOC_RANGE", "Mask", "CU_Q", "CU_K"}
BF16_POINTERS = {"Q", "K", "V", "Out", "O", "DO", "DQ", "DK", "DV"}


def signature(fn, constexprs, pointer_types):
    """Types by name; like a real launch, unit strides of the last dim become constants 1."""
    params = inspect.signature(fn.fn if hasattr(fn, "fn") else fn).parameters
    sig = {}
    for name in params:
        if re.fullmatch(r"stride_\w*d", name):
            constexprs[name] = 1
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in INT_POINTERS:
            sig[name] = "*i32" if name != "Mask" else "*i8"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in BF16_POINTERS:
            sig[name] = "*bf16"
        else:
            sig[name] = "i32"
    return sig


def ptxas_report(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    path = "/tmp/_compile_check.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", "/tmp/_compile_check.cubin"],
                         capture_output=True, text=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}"


def compile_one(label, fn, constexprs, num_warps, num_stages, pointer_types=None, maxnreg=None):
    params = inspect.signature(fn.fn if hasattr(fn, "fn") else fn).parameters
    constexprs = {k: v for k, v in constexprs.items() if k in params}  # e.g. HAS_SINKS: the forward's only
    sig = signature(fn, constexprs, pointer_types or {})
    # NOTE: like a launch on real tensors: pointers and other strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or (t == "i32" and n.startswith("stride"))}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages,
                                        **({"maxnreg": maxnreg} if maxnreg else {})))
    except Exception as err:  # noqa: BLE001
        print(f"FAIL {label}: {type(err).__name__}: {str(err)[-1500:]}", flush=True)
        return False
    ttgir = k.asm["ttgir"]
    # NOTE: waits on TMA barriers per key/query loop: one per step (K and V, or Q and dO, behind
    # one barrier) keeps the step one basic block, which ptxas schedules as a whole.
    waits = f" tma_waits={ttgir.count('ttng.wait_barrier')} loops={ttgir.count('scf.for ')}" \
        if "async_tma_copy" in ttgir else ""
    print(f"ok   {label}: shared={k.metadata.shared} {ptxas_report(k.asm['ptx'])}{waits}", flush=True)
    return True


def v2_cases():
    flags = [dict(MASK_LEFT=False, MASK_RIGHT=False, HAS_DOCS=False, HAS_DROPOUT=False),
             dict(MASK_LEFT=False, MASK_RIGHT=True, HAS_DOCS=False, HAS_DROPOUT=False),
             dict(MASK_LEFT=False, MASK_RIGHT=True, HAS_DOCS=False, HAS_DROPOUT=True),
             dict(MASK_LEFT=True, MASK_RIGHT=True, HAS_DOCS=True, HAS_DROPOUT=True),
             dict(MASK_LEFT=True, MASK_RIGHT=True, HAS_DOCS=False, HAS_DROPOUT=False, VARLEN=True),
             # the attention variants, all on (FAST_TANH: the soft-cap's tanh.approx of half inputs;
             # HAS_ALIBI=2: the one-sided ALiBi a causal launch gets)
             dict(MASK_LEFT=False, MASK_RIGHT=True, HAS_DOCS=False, HAS_DROPOUT=False, HAS_ALIBI=2,
                  HAS_SOFTCAP=True, HAS_SINKS=True, FAST_TANH=True)]
    off = dict(HAS_ALIBI=False, HAS_SOFTCAP=False, HAS_SINKS=False, FAST_TANH=False)
    for d, f, tma in ((d, f, tma) for d in (64, 128) for f in flags for tma in (False, True)):
        # tma: tiles through tensor descriptors (the H100 default), else pointer tiles
        tag = ("+".join(k for k, v in f.items() if v) or "plain") + (" tma" if tma else "")
        varlen = f.get("VARLEN", False)
        f = {**off, **f, "USE_TMA": tma, "VARLEN": varlen}
        stats_tma = tma and not varlen  # VARLEN: a sequence's statistics rows are not 16-byte aligned
        for c in flash_v2.configs("fwd", head_dim=d)[:3]:
            yield (f"v2 fwd d={d} {tag} {_label(c)}", flash_v2._fwd_kernel,
                   dict(D=d, HEAD_DIM=d, DOT_PRECISION="tf32", MASKED_LSE=0.0, BLOCK_M=c["BLOCK_M"],
                        BLOCK_N=c["BLOCK_N"], **f), c["num_warps"], c["num_stages"], {}, c["maxnreg"])
        for name, pass_name, kernel, extra in (
                ("dkdv", "dkdv", flash_v2._bwd_dkdv, dict(ATOMIC_DQ=False, STATS_TMA=stats_tma, DQ_TMA=False)),
                ("dkdv+atomic-dq", "dkdv_atomic", flash_v2._bwd_dkdv,
                 dict(ATOMIC_DQ=True, STATS_TMA=stats_tma, DQ_TMA=stats_tma)),
                ("dq", "dq", flash_v2._bwd_dq, {})):
            for c in flash_v2.configs(pass_name, head_dim=d)[:2]:
                yield (f"v2 {name} d={d} {tag} {_label(c)}", kernel,
                       dict(D=d, HEAD_DIM=d, DOT_PRECISION="tf32", BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                            **f, **extra), c["num_warps"], c["num_stages"],
                       {"DQ": "*fp32"} if extra.get("ATOMIC_DQ") else {}, c["maxnreg"])


def _label(config: dict) -> str:
    """128x64 w8 s3 (and r128 when the registers are capped): a config in a case's label."""
    cap = f" r{config['maxnreg']}" if config["maxnreg"] else ""
    return f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}{cap}"


def v1_cases():
    for d in (64, 128):
        for bm, bn in ((64, 64), (64, 128), (128, 128)):
            # the variants (ALiBi and soft-cap; sinks are host-side) on the widest mask only
            for drop, variants in ((False, False), (True, False), (True, True)):
                f = dict(HAS_LEFT=False, HAS_RIGHT=True, HAS_DOCS=False, HAS_DROPOUT=drop, HAS_ALIBI=variants,
                         HAS_SOFTCAP=variants)
                meta = dict(BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, INPUT_PRECISION="tf32", **f)
                tag = f"drop={drop}" + (" alibi+softcap" if variants else "")
                for w in sorted({flash_v1._num_warps(d), 8, 16}):
                    yield (f"v1 fwd d={d} {bm}x{bn} {tag} w{w}", flash_v1._flash_v1_fwd_kernel, meta, w, 1,
                           {"O": "*fp32"})
                    for atomic in (False, True):
                        yield (f"v1 bwd d={d} {bm}x{bn} {tag} w{w}{' atomic' if atomic else ''}",
                               flash_v1._flash_v1_bwd_kernel, dict(meta, ATOMIC_DQ=atomic), w, 1,
                               {"O": "*bf16", "DQ": "*fp32"})


def decode_cases():
    """The split pass with every mask, per-sequence lengths, ALiBi and the soft-cap on, at each
    autotune config, and the combine pass with sinks; the scratch O_part / LSE_part are float32
    and SEQLENS int32."""
    pointers = {"SEQLENS": "*i32", "O_part": "*fp32", "LSE_part": "*fp32"}
    for d in (64, 128):
        for block_m in (16, 64):
            for block_n, w, s in decode.SPLIT_CONFIGS:
                yield (f"decode split d={d} m{block_m} n{block_n} w{w} s{s}", decode._decode_split_kernel,
                       dict(D=d, HEAD_DIM=d, HAS_SEQLENS=True, MASK_LEFT=True, MASK_RIGHT=True,
                            DOT_PRECISION="tf32", HAS_ALIBI=True, HAS_SOFTCAP=True, FAST_TANH=True,
                            BLOCK_M=block_m, BLOCK_N=block_n), w, s, pointers)
        yield (f"decode combine d={d}", decode._decode_combine_kernel,
               dict(D=d, HEAD_DIM=d, MASKED_LSE=0.0, HAS_SINKS=True, BLOCK_S=64), 4, 1,
               {"O_part": "*fp32", "LSE_part": "*fp32"})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=[], help="substrings of the labels to compile")
    args = parser.parse_args()
    print("triton", triton.__version__, "dropout bits", _dropout.DROPOUT_BITS, flush=True)
    ok = compile_one("dropout mask kernel", _dropout._dropout_mask_kernel, dict(BLOCK_M=16, BLOCK_N=64), 4, 1,
                     {"Mask": "*i8"})
    for label, fn, constexprs, w, s, *rest in list(v2_cases()) + list(v1_cases()) + list(decode_cases()):
        if args.only and not any(o in label for o in args.only):
            continue
        ok &= compile_one(label, fn, constexprs, w, s, *rest)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
