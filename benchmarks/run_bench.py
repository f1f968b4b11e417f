"""Run the benchmark suite (same code as ``mpdcompress bench``); pass the same flags, e.g. --quick."""

import sys

from mpdcompress.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
