"""The names of a training step's ranges, as torch.profiler traces (and Nsight Systems, through NVTX) show them.

Emitted by train (timing.py: "data"; step.py: the rest) and read back by
`python -m profiling inspect`; both take them from here. No torch import:
the trace reader does not need it.
"""

DATA = "data"            # the host blocked waiting for the loader's next batch
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
COMPUTE = (FORWARD, BACKWARD, OPTIMIZER)
ALL = (DATA, *COMPUTE)
