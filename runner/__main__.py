"""cronium-runner: runs one Cronium payload on a target (see docs/PROTOCOL.md, docs/RUNNER.md)."""
import sys

from cronium_runner.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
