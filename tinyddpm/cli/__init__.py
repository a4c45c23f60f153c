"""The command-line layer of sample.py, one module per mode: its flags, the checks that span flags, and what it
prints and writes. The library (the modules of tinyddpm/) takes typed options; only the scripts, config.py's flag
builder, the standalone `python -m tinyddpm.X` tools and this package read argparse's `args`.

    sample.py → cli.common (mode, checkpoint, SamplingOptions) → cli.<mode>.run → the library → samplers.sample
"""
