#!/usr/bin/env python3
"""Offline tokenize-and-pack: raw instruction records → witscale packed dataset. See --help and
witscale/data/format.py for the format."""
import os
import sys

try:
    import witscale  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from witscale.data.pack_cli import main

if __name__ == "__main__":
    sys.exit(main())
