#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for SECONDS (default 20) starting from its seed
# corpus in fuzz/corpus/<target>/; fails on the first crash, leak, timeout or out-of-memory.
# New inputs a run finds go to a scratch directory, so the committed corpora stay small.
# Crash inputs are left in fuzz/artifacts/<target>/; replay one with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
seconds="${1:-20}"
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"

cargo +nightly fuzz build
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
targets="$(cargo +nightly fuzz list)"
for target in $targets; do
    echo "=== fuzzing $target for ${seconds}s"
    mkdir -p "$scratch/$target" "corpus/$target"
    # -rss_limit_mb: one input must never make a parser hold more than this.
    # -timeout: one input must never take longer than this (the stateful targets run up to
    # 256 steps of handshakes and key agreements).
    if cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$scratch/$target.log" || true
    else
        tail -n 100 "$scratch/$target.log" >&2
        echo "fuzz target $target failed; the input is under fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "all fuzz targets ran ${seconds}s each without a crash"
