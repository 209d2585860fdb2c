#!/usr/bin/env bash
# Set up ./.venv with fatrain installed (editable, with the dev extra).
#
#   bash scripts/setup.sh           # make the venv, install torch, then fatrain
#   bash scripts/setup.sh --plan    # print what would be installed and from where; install nothing
#
# torch is installed first, so that the project's plain `torch` requirement is already met:
#   - an NVIDIA GPU is visible (nvidia-smi -L): `torch` from pip's configured index (the CUDA build);
#   - no GPU: the CPU build, torch==2.13.0 from PyTorch's CPU wheel index
#     (https://download.pytorch.org/whl/cpu), so pip pulls no multi-GB CUDA build. The index is
#     checked first with a short timeout; when it cannot be reached, torch comes from pip's
#     configured index instead, with a warning (where that index has only the CUDA build on
#     Linux, that is the one installed);
#   - torch already in the venv: kept.
#
# Settings (environment variables):
#   PYTHON                 the Python that makes the venv (default python3)
#   FATRAIN_VENV           the venv's folder (default .venv in the repository)
#   FATRAIN_TORCH_SPEC     the torch to install (default torch==2.13.0 without a GPU, torch with one)
#   FATRAIN_TORCH_INDEX    the CPU wheel index (default https://download.pytorch.org/whl/cpu)
#   FATRAIN_INDEX_TIMEOUT  seconds the index check waits (default 10)
# and PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS as usual for everything pip installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PLAN=0
for arg in "$@"; do
  case "$arg" in
    --plan) PLAN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (allowed: --plan, --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
VENV=${FATRAIN_VENV:-.venv}
CPU_INDEX=${FATRAIN_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
INDEX_TIMEOUT=${FATRAIN_INDEX_TIMEOUT:-10}
CPU_TORCH=torch==2.13.0

# Why the wheel index cannot be used (one line), or nothing when it answers. One GET of the index's
# torch page; the join bounds the name lookup too, which urllib's timeout does not cover.
index_unreachable() {
  "$PYTHON" - "$1" "$INDEX_TIMEOUT" <<'EOF'
import os, sys, threading, urllib.error, urllib.parse, urllib.request

url, timeout = sys.argv[1].rstrip("/") + "/torch/", float(sys.argv[2])
failure = []

def attempt():
    try:
        if urllib.parse.urlsplit(url).scheme == "file":
            path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
            failure.append(None if os.path.exists(path) else f"{path} does not exist")
            return
        urllib.request.urlopen(url, timeout=timeout).close()
        failure.append(None)
    except urllib.error.HTTPError as err:
        failure.append(f"HTTP {err.code}")
    except urllib.error.URLError as err:
        failure.append(str(getattr(err.reason, "strerror", None) or err.reason))
    except Exception as err:  # noqa: BLE001 (a bad URL, a timeout: the index is not usable)
        failure.append(f"{type(err).__name__}: {err}")

thread = threading.Thread(target=attempt, daemon=True)
thread.start()
thread.join(timeout + 0.5)
reason = failure[0] if failure else f"no answer within {timeout:g} s"
if reason:
    print(reason)
EOF
}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# ----- the plan: torch's spec and where it comes from -----
TORCH_ARGS=()
if [ -x "$VENV/bin/python" ] && TORCH_HAVE=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  TORCH_LINE="torch: $TORCH_HAVE is already in $VENV, kept"
elif has_gpu; then
  TORCH_ARGS=("${FATRAIN_TORCH_SPEC:-torch}")
  TORCH_LINE="torch: ${TORCH_ARGS[0]} from pip's configured index (an NVIDIA GPU is visible: the CUDA build)"
else
  spec=${FATRAIN_TORCH_SPEC:-$CPU_TORCH}
  reason=$(index_unreachable "$CPU_INDEX")
  if [ -z "$reason" ]; then
    TORCH_ARGS=(--index-url "$CPU_INDEX" "$spec")
    TORCH_LINE="torch: $spec from $CPU_INDEX (no NVIDIA GPU visible: the CPU build)"
  else
    echo "warning: the CPU wheel index $CPU_INDEX cannot be reached ($reason); torch comes from pip's" \
         "configured index instead, which on Linux gives the CUDA build (several GB) unless a CPU wheel is" \
         "at hand (set FATRAIN_TORCH_INDEX to another CPU wheel index)" >&2
    TORCH_ARGS=("$spec")
    TORCH_LINE="torch: $spec from pip's configured index (no NVIDIA GPU visible; $CPU_INDEX cannot be reached)"
  fi
fi
if [ -x "$VENV/bin/python" ]; then
  VENV_LINE="venv: $VENV exists, kept"
else
  VENV_LINE="venv: create $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
fi
FATRAIN_LINE="fatrain: pip install -e .[dev] (editable) and its other requirements, from pip's configured index"

if [ "$PLAN" = 1 ]; then
  printf '%s\n' "$VENV_LINE" "$TORCH_LINE" "$FATRAIN_LINE"
  exit 0
fi

# ----- install -----
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
echo "$TORCH_LINE"
if [ ${#TORCH_ARGS[@]} -gt 0 ]; then
  pip_install "${TORCH_ARGS[@]}"
fi
pip_install -e ".[dev]"
echo "fatrain is set up in $(cd "$VENV" && pwd)"
