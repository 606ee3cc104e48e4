#!/usr/bin/env python3
"""Write a GGUF model's sink profile into a copy of it (kvsink.* metadata).

    python convert/kvsink_profile.py IN.gguf OUT.gguf [--text FILE] [--tokens N] [-t THREADS]

The same as `python -m kvsink_cpp profile`; see kvsink_cpp/profile.py for the keys.
"""
import os
import sys

# run from a checkout without installing: the package sits beside this folder
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from kvsink_cpp.profile import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
