"""`pare parity` with the fast loop's fused step turned off (pare/fast/denoise.py FUSED_STEP = 0): the fast UNet with
the scheduler class's own step, to tell the step kernel's error from the fast UNet's in a --fast pipeline report.

    python scripts/parity_unfused.py --fast --config sd15 --device cuda --dtype fp16 --components pipeline --schedulers LMS
"""
import sys

import pare.fast.denoise as fast_denoise
from pare.cli import main

if __name__ == "__main__":
    fast_denoise.FUSED_STEP = 0
    sys.exit(main(["parity", *sys.argv[1:]]))
