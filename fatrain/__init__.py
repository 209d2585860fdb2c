"""fatrain: long-sequence GPT training built around FlashAttention written in Triton.

Importing the package decides how Triton kernels run. Where no CUDA GPU is present the
kernels go through the Triton interpreter, which reads ``TRITON_INTERPRET`` when
``triton`` is first imported, so the variable is set here, before anything imports it.
An explicit ``TRITON_INTERPRET`` in the environment always wins.
"""

import os
import sys

__version__ = "0.1.0"


def _select_triton_mode() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        if "triton" in sys.modules:
            import warnings

            warnings.warn(
                "triton was imported before fatrain on a machine without a CUDA GPU; "
                "set TRITON_INTERPRET=1 before importing triton to run fatrain's kernels on the CPU",
                stacklevel=3,
            )
        os.environ["TRITON_INTERPRET"] = "1"


_select_triton_mode()
