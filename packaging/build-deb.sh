#!/usr/bin/env bash
# Builds the Debian package of meshvpn and prints the path of the .deb (the last line of
# stdout; everything else goes to stderr).
#
#   packaging/build-deb.sh                      # -> target/debian/meshvpn_<version>-1_<arch>.deb
#   packaging/build-deb.sh --output DIR_OR_FILE # extra arguments go to `cargo deb`
#
# Steps: release build; man pages and shell completions written into target/assets/ by
# `meshvpn generate --out target/assets` (the asset paths in Cargo.toml's
# [package.metadata.deb] point there); `cargo deb --no-build`. Installs cargo-deb first
# (`cargo install cargo-deb --locked`) if `cargo deb` is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: cargo-deb is missing; running: cargo install cargo-deb --locked" >&2
    cargo install cargo-deb --locked >&2
fi

echo "build-deb: cargo build --release" >&2
cargo build --release --bin meshvpn >&2

# The binary is wherever Cargo puts it (CARGO_TARGET_DIR, build.target-dir, ...); cargo-deb
# resolves the `target/release/` asset prefix the same way.
target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target_dir/release/meshvpn"
if [ ! -x "$bin" ]; then
    echo "build-deb: $bin was not built" >&2
    exit 1
fi

# Generated assets always go to target/assets under the crate (not the target dir): Cargo.toml
# names them by that literal path. Start clean so pages of removed subcommands do not linger.
assets=target/assets
rm -rf "$assets"
echo "build-deb: $bin generate --out $assets" >&2
if ! "$bin" generate --out "$assets" >&2; then
    echo "build-deb: '$bin generate --out $assets' failed (is the hidden 'generate' subcommand wired to meshvpn::cli::generate::write_all?)" >&2
    exit 1
fi

# The release profile keeps debug info (debug = 1); the packaged binary is stripped unless
# the caller asks for the symbols (--no-strip, --separate-debug-symbols, --dbgsym).
strip=--strip
for arg in "$@"; do
    case "$arg" in
        --no-strip | --separate-debug-symbols | --dbgsym) strip= ;;
    esac
done
echo "build-deb: cargo deb --no-build ${strip:+$strip }$*" >&2
out=$(cargo deb --no-build ${strip:+"$strip"} "$@")
deb=$(printf '%s\n' "$out" | tail -n 1)
if [ ! -f "$deb" ]; then
    printf '%s\n' "$out" >&2
    echo "build-deb: cargo deb did not report a .deb file" >&2
    exit 1
fi
echo "build-deb: built $deb" >&2
echo "$deb"
