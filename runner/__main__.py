"""cronium-runner entry point (stub; the full runner is built in issue 3)."""
import hashlib
import json
import sys

VERSION = "0.1.0"
PROTOCOL = 1


def _own_sha256():
    try:
        with open(sys.argv[0], "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def main(argv):
    if argv[:1] == ["version"]:
        print(json.dumps({"version": VERSION, "protocol": PROTOCOL, "sha256": _own_sha256()}))
        return 0
    sys.stderr.write("usage: cronium-runner.pyz version\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
