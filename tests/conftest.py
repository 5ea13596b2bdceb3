import os
import sys

# The helpers in tests/ (distributed.py) are imported as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
# Process helpers shared with the benchmarks (free ports, stopping, torchrun).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
