#!/usr/bin/env bash
# Session 7, GPU call C (about 3 minutes on an H100): issue 7's training grid on the session-7
# kernels (LSE and Delta descriptors, base-2 LSE in the dK/dV pass): the same commands as
# session 6's call G (flash_v2, sdpa_flash, sdpa_cudnn at seq_len 1k-16k, GPT-2 small, bf16
# eager, 32k tokens/step, 30 steps, then fatrain-report; job folders back as jobs.tar).
# Usage: OUT=<folder> bash experiments/scripts/gpu_session7_c.sh
exec bash "$(dirname "$0")/gpu_session6_g.sh"
