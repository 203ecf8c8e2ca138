#!/usr/bin/env bash
# A short hash of the code a run used: the .py and .sh files under pare/, parity_tests/, benchmarks/ and scripts/.
# The device's git copy may show an older HEAD than the working tree it got, so its logs print this instead; run it
# here on a checkout (`git stash -u` first if the tree is dirty) to tell which commit a log came from.
cd "$(dirname "$0")/.." && find pare parity_tests benchmarks scripts \( -name '*.py' -o -name '*.sh' \) \
  -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12
