"""Stubs generated from proto/ by proto/generate.py; do not edit."""

import warnings

# The stubs are protobuf 6 gencode, which protobuf 7 loads by its cross-version guarantee but warns
# about once per file; the package's requirement (protobuf<8) keeps every runtime it allows in range.
warnings.filterwarnings("ignore", message=r"Protobuf gencode version 6\.", category=UserWarning)
