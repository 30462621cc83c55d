#!/usr/bin/env bash
# `meson install` as a user runs it, into a staging folder (DESTDIR): the daemon, sidecarctl, the
# client library with its headers and pkg-config file, and the Python package must be there and
# usable from there: a C++ program builds with `pkg-config sidecar` and runs, the installed
# daemon answers --help, and the installed Python package imports. Exits 77 (skip) without
# pkg-config or a C++ compiler.
#   install_test.sh BUILD_DIR [PYTHON]   (PYTHON: the interpreter the package was built for)
set -euo pipefail
build=$1
python=${2:-python3}
command -v pkg-config >/dev/null || { echo "SKIP: pkg-config is not installed"; exit 77; }
cxx=${CXX:-c++}
command -v "$cxx" >/dev/null || { echo "SKIP: no C++ compiler ($cxx)"; exit 77; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
meson install -C "$build" --no-rebuild --quiet --destdir "$stage" >"$stage.log" 2>&1 || {
  cat "$stage.log"; rm -f "$stage.log"; echo "FAIL: meson install"; exit 1; }
rm -f "$stage.log"

prefix=$(meson introspect "$build" --buildoptions | "$python" -c \
  'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "prefix"))')
root="$stage$prefix"
fail() { echo "FAIL: $*"; exit 1; }

for f in sbin/sidecard bin/sidecarctl etc/sidecar/sidecar.example.toml share/sidecar/schema/sidecar.capnp include/sidecar/sidecar.h include/sidecar/client.h include/sidecar/error.h; do
  [ -e "$root/$f" ] || fail "$f is not installed under $prefix"
done
lib=$(find "$root" -name 'libsidecar.so.*' -print -quit)
[ -n "$lib" ] || fail "libsidecar.so.* is not installed"
pc=$(find "$root" -name sidecar.pc -print -quit)
[ -n "$pc" ] || fail "sidecar.pc is not installed"
libdir=$(dirname "$lib")

# The installed daemon and tool run and explain themselves.
LD_LIBRARY_PATH="$libdir" "$root/sbin/sidecard" --help | grep -q -- "--arena-size" || fail "sidecard --help"
LD_LIBRARY_PATH="$libdir" "$root/bin/sidecarctl" --help >/dev/null || fail "sidecarctl --help"

# A consumer program builds against the installed headers and library through pkg-config alone.
cat >"$stage/consumer.cc" <<'CC'
#include <sidecar/sidecar.h>
#include <cstdio>
int main() {
  try {
    sidecar::RankConfig config;
    config.rank = 0;
    config.group = {0};
    config.socketPath = "/nonexistent/sidecar.sock";
    sidecar::Sidecar::connect(config);
  } catch (const sidecar::Error& e) {
    std::printf("%s\n", sidecar::toString(e.code()));
    return 0;
  }
  return 1;
}
CC
flags=$(PKG_CONFIG_PATH=$(dirname "$pc") PKG_CONFIG_SYSROOT_DIR="$stage" pkg-config --cflags --libs sidecar)
# shellcheck disable=SC2086
"$cxx" -std=c++20 "$stage/consumer.cc" -o "$stage/consumer" $flags || fail "a program does not build with pkg-config sidecar ($flags)"
out=$(LD_LIBRARY_PATH="$libdir" "$stage/consumer") || fail "the consumer program did not get a typed error"
[ "$out" = "unavailable" ] || fail "connecting to a missing daemon gave '$out', not 'unavailable'"

# The Python package (when it was built) imports from where it was installed.
pkgdir=$(find "$root" -type d -name sidecar -path '*-packages/*' -print -quit)
if [ -n "$pkgdir" ]; then
  (cd "$stage" && PYTHONPATH=$(dirname "$pkgdir") "$python" -c \
    'import sidecar; assert sidecar.Sidecar and sidecar.SidecarConfig; print(sidecar.__file__)') \
    | grep -q "^$(dirname "$pkgdir")" || fail "the installed Python package does not import from $pkgdir"
fi
echo "OK: installed under $prefix: daemon, sidecarctl, libsidecar ($(basename "$lib")), headers, sidecar.pc${pkgdir:+, Python package}"
