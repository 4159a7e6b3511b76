#!/usr/bin/env bash
# Stage a prepared data set for the lent GPU host, which has no ../shared/data and takes at most
# 64 MiB a transfer: copies the images PREPARED's manifests list (not the rest of its source
# folder) into .gpu/data/<class>/... of the checkout (git-ignored), to be carried in a call of
# its own; on the host, `python -m planktonio prepare --source .gpu/data ...` prepares it again.
#
# Usage, from the checkout:  bash profiling/stage-data.sh PREPARED [MAX_MB]   (default 60)
set -euo pipefail
prepared="${1:?usage: bash profiling/stage-data.sh PREPARED [MAX_MB]}"
max_mb="${2:-60}"
root="$(git rev-parse --show-toplevel)"
source_root="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["root"])' "$prepared/classes.json")"
grep -qxF '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$root/.git/info/exclude"
rm -rf "$root/.gpu/data"
mkdir -p "$root/.gpu/data"
for split in train valid test; do
    [ -f "$prepared/$split.txt" ] || continue
    while IFS= read -r line; do
        path="${line% *}"  # "relative/path label": the label is the last field, paths may hold spaces
        mkdir -p "$root/.gpu/data/$(dirname "$path")"
        cp "$source_root/$path" "$root/.gpu/data/$path"
    done < "$prepared/$split.txt"
done
size_mb="$(du -sm "$root/.gpu/data" | cut -f1)"
if [ "$size_mb" -gt "$max_mb" ]; then
    echo "stage-data: .gpu/data holds $size_mb MiB, over $max_mb: prepare fewer images per class" >&2
    exit 1
fi
echo "staged $(find "$root/.gpu/data" -type f | wc -l) images ($size_mb MiB) in .gpu/data: carry it in a call of its own"
