#!/usr/bin/env bash
# Print the work tree's state: status, the diff of tracked files, and a checksum of each untracked file.
# .ci/test.sh compares it before and after the tests: they must leave the tree as they found it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
git rev-parse --git-dir >/dev/null 2>&1 || exit 0
git status --porcelain --untracked-files=all
git --no-pager diff HEAD
git ls-files --others --exclude-standard -z | xargs -0 -r sha1sum
