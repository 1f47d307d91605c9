"""Runs the real launcher (``tpi_runtime.launcher.main``: its signals, supervision, exit code and
termination message) with small child programs in place of the runtime:

    python launch_harness.py [launch flags...] -- CHILD ARGV...
"""

from __future__ import annotations

import os
import sys

from tpi_runtime.launcher import main
from tpi_runtime.settings import build_parser

if __name__ == "__main__":
    split = sys.argv.index("--")
    flags, child = sys.argv[1:split], sys.argv[split + 1 :]
    # "serve": the launch command's required runtime command; the child program replaces it.
    sys.exit(main(build_parser().parse_args(["launch", *flags, "serve"]), os.environ, program=child))
