"""`python -m server [flags]` = `sentiric-llama serve [flags]`."""

import sys

from server.serve import serve

if __name__ == "__main__":
    sys.exit(serve())
