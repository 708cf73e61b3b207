"""`rcd demo`: SeqD vs RCD on held-out synthetic problems, from the small shipped checkpoints.

`run_demo` loads (or trains, `train=True`) the reference, the equal-budget SeqD model and the
RCD model, decodes the held-out test problems at every step budget and confidence threshold
(SeqD; RCD warm and cold), and writes results.json and demo.png.
"""

from rcd_ext.demo.run import run_demo

__all__ = ["run_demo"]
