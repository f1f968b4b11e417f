"""Run the command line as ``python -m mpdcompress`` (what torchrun starts)."""

import sys

from .cli.main import main

sys.exit(main())
