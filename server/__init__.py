"""The fedlora Flower ServerApp and its strategies."""

import os

# torch backs each CPU tensor of 2 MB or more with transparent huge pages when this is set
# (PyTorch's THP_MEM_ALLOC_ENABLE). A round makes fresh buffers of hundreds of MB (the float64
# running sum, stacked factors, replies read back from the spill), and a fresh buffer costs a
# page fault per 4 KB page without it: allocating and filling 5 GB took 2.6 s with 1.3 million
# faults, 0.8-1.2 s with 13 thousand, on the 2-core VM of docs/benchmarks.md. Read at torch's
# first large allocation; THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
