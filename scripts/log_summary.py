#!/usr/bin/env python3
"""Print one line per epoch from a fairseq-train log (finished or still running): the epoch's kind
(ARCH refresh / reuse), train / valid / adversarial loss, seconds, the time that was left, and ARCH's
counters (forwards per batch, fresh / cached / rebuilt sentences, neighbour search seconds).
The same lines that scripts/progress.py prints live while fairseq-train runs (demo.sh)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import progress  # noqa: E402


def main(argv):
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(f"usage: {os.path.basename(__file__)} TRAIN_LOG\n\n{__doc__}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    progress.summary(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
