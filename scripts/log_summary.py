#!/usr/bin/env python3
"""Print one line per epoch from a fairseq-train log: train/valid loss and ARCH's
counters (regulariser, forwards per batch, cache reads, neighbour rebuilds)."""

import re
import sys

KEYS = ["loss", "adv_loss", "adv_fwd_per_batch", "arch_fresh", "arch_cached", "arch_rebuilt", "arch_nn_search_s"]


def fields(line):
    return dict(re.findall(r"\| ([a-z_0-9]+) ([-0-9.e]+)", line))


def main(path):
    valid = {}
    rows = []
    with open(path) as f:
        for line in f:
            m = re.search(r"\| (train|valid) \| epoch (\d+)", line)
            if not m:
                continue
            if m.group(1) == "valid":
                valid[int(m.group(2))] = fields(line).get("loss", "?")
            else:
                rows.append((int(m.group(2)), fields(line)))
    for epoch, fl in rows:
        extras = " ".join(f"{k}={fl[k]}" for k in KEYS[1:] if k in fl)
        print(f"  epoch {epoch:3d}  train loss {fl.get('loss', '?'):>6}  valid loss {valid.get(epoch, '?'):>6}  {extras}")


if __name__ == "__main__":
    main(sys.argv[1])
