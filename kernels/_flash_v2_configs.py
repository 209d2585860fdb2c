"""flash_v2's launch configurations: the lists its autotuners choose from on CUDA, and the
one small configuration of the CPU interpreter.

A row is (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]); maxnreg caps the registers
per thread (ptxas .maxnreg), e.g. so that two 8-warp programs share an SM. BLOCK_M tiles
what a program owns and BLOCK_N what it loops over: queries x keys in the forward and the
dQ pass, keys x queries in the dK/dV pass. The first row of each list is the default when
autotuning is off (FATRAIN_AUTOTUNE=0), so it must fit shared memory for float32 inputs
too (the autotuner skips configs that do not fit; a pinned one would fail). Heads wider
than 128 get the "wide" lists: smaller tiles, so the Q, K, V stages fit in shared memory
and the float32 accumulators in registers.
"""

from __future__ import annotations

FWD = ((128, 64, 8, 3),
       # NOTE: 128 registers a thread (166 uncapped, no spills at d=64), so two programs share
       # an SM (2 x 113 KB of shared memory just fits): the fastest d=64 causal forward at
       # GPT-2 small's training shapes, +2-5% on the next. Second in the list: timed last, its
       # autotune time at 16k came out 3% under its pinned one.
       (128, 128, 8, 3, 128),
       (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
       (128, 64, 8, 4), (128, 64, 8, 2),
       (64, 64, 4, 3))  # NOTE: twice the programs; fastest at d=128 causal N=2048 with TMA
FWD_WIDE = ((64, 64, 4, 2), (64, 32, 4, 2))
DKDV = ((32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3),
        (64, 128, 8, 2), (64, 128, 8, 4), (32, 128, 4, 4),
        (16, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 4),  # these three: no spills at d=128
        (32, 64, 4, 3))  # NOTE: fastest at d=64 causal with TMA
DKDV_WIDE = ((32, 32, 8, 2), (16, 32, 4, 2))
DQ = ((128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2),
      (128, 64, 16, 3), (128, 128, 8, 3),
      (64, 32, 4, 3))  # NOTE: fastest at d=128 causal N=2048 with TMA
DQ_WIDE = ((64, 32, 8, 2), (32, 32, 4, 2))

#: pass -> (rows for head dims up to 128, rows for wider heads); dkdv_atomic is the dK/dV
#: pass of deterministic=False (it also adds dQ with atomics) and shares its lists.
ROWS = {"fwd": (FWD, FWD_WIDE), "dkdv": (DKDV, DKDV_WIDE), "dkdv_atomic": (DKDV, DKDV_WIDE), "dq": (DQ, DQ_WIDE)}

# NOTE: the interpreter runs one program at a time in numpy: 32 x 16 blocks keep its
# per-program overhead low and still give the CPU tests several blocks and a diagonal (the
# dK/dV pass 32 query rows a step: the fewest for which it reads LSE and Delta through
# descriptors).
INTERPRETER = {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dkdv": dict(BLOCK_M=32, BLOCK_N=32),
               "dkdv_atomic": dict(BLOCK_M=32, BLOCK_N=32), "dq": dict(BLOCK_M=32, BLOCK_N=16)}
#: Rows per program of the Delta / base-2 LSE preprocess (deterministic=False only).
PREPROCESS_BLOCK_M = 64


def as_dict(row: tuple) -> dict:
    """A row as the public config dict: BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg (None: uncapped)."""
    return dict(BLOCK_M=row[0], BLOCK_N=row[1], num_warps=row[2], num_stages=row[3],
                maxnreg=row[4] if len(row) > 4 else None)


def triton_configs(rows) -> list:
    """The rows as ``triton.Config``s, in order."""
    import triton
    return [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                          num_stages=c["num_stages"], maxnreg=c["maxnreg"]) for c in map(as_dict, rows)]
