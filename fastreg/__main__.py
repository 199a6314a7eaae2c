"""``python -m fastreg`` = the ``fastreg`` command (also under ``torchrun ... -m fastreg``)."""
import sys

from .cli import main

sys.exit(main())
