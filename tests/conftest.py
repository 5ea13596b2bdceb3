import os
import sys

# The helpers in tests/ (distributed.py) are imported as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
