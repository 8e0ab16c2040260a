import os

import torch

# Without a GPU, the Triton kernels run in the interpreter on CPU tensors. Must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
