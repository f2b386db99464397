#!/usr/bin/env python3
"""Offline tokenize-and-pack: raw instruction records → witscale packed dataset. See --help and
witscale/data/format.py for the format."""
import os
import sys

# this checkout's witscale, as the other tools do (not another one an editable install points at)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from witscale.data.pack_cli import main

if __name__ == "__main__":
    sys.exit(main())
