#!/usr/bin/env bash
# Re-fetch the page's splat viewer, pinned: gsplat.js (npm package "gsplat", MIT, by Dylan Ebert;
# https://github.com/dylanebert/gsplat.js), its one self-contained ES module (web workers and
# WebAssembly inlined) copied unmodified to gsplat.js, its licence to LICENSE.gsplat. npm checks the
# tarball against the registry's sha512 integrity; the copied files are then checked against the
# sha256 sums below, so an update is a deliberate edit of VERSION and these sums.
# Usage: fast3d/serving/static/vendor/fetch.sh   (needs npm)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
VERSION=1.2.9
SHA256_JS=bd124c4103dc83e7d9fc9f56e396347e846413f40fe10e4bf8174283de649cc3
SHA256_LICENSE=715a406f011c6ed1a2ec66a6b476fc7702ff19799aa59c8d05a1b2c967c81929
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "gsplat@$VERSION" >/dev/null && tar xzf "gsplat-$VERSION.tgz")
echo "$SHA256_JS  $tmp/package/dist/index.es.js" | sha256sum -c --quiet
echo "$SHA256_LICENSE  $tmp/package/LICENSE" | sha256sum -c --quiet
cp "$tmp/package/dist/index.es.js" "$here/gsplat.js"
cp "$tmp/package/LICENSE" "$here/LICENSE.gsplat"
echo "gsplat $VERSION -> $here/gsplat.js"
