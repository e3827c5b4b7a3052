#!/usr/bin/env bash
# Installs everything tern needs on a fresh Debian 12 (bookworm) machine, as root.
# Idempotent: a second run changes nothing and takes a few seconds.
# It downloads only through apt (and cargo, when the caller builds).
set -euo pipefail

log() { printf '[install] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install-prereqs: must run as root (apt-get, network namespaces and QEMU need it)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Packages the lab, the guest image builder and the guest workload need; PostgreSQL for the
# controller store tests (a throwaway server, scripts/pg-test-server.sh) and the HA demo;
# chromium and its WebDriver for the web view's browser test (tern-server/tests/web.rs).
BASE_PKGS=(busybox-static iproute2 cpio gzip gcc libc6-dev make xz-utils postgresql chromium chromium-driver)

qemu_major() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -n1
}

missing=()
for p in "${BASE_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

need_qemu=0
if [ "$(qemu_major)" -lt 9 ]; then need_qemu=1; fi

if [ ${#missing[@]} -eq 0 ] && [ $need_qemu -eq 0 ]; then
  log "prerequisites already installed (QEMU $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'))"
  exit 0
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ $need_qemu -eq 1 ] && [ "$codename" = "bookworm" ]; then
  # QEMU 7.2 from bookworm loses dirty pages under TCG (fixed in 9.0); backports has 10.0.x.
  # Reuse the Debian mirror this machine is already configured with.
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    log "adding bookworm-backports from $mirror"
    cat > /etc/apt/sources.list.d/tern-bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
fi

log "apt-get update"
apt-get update -qq

if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ $need_qemu -eq 1 ]; then
  if [ "$codename" = "bookworm" ]; then
    log "installing qemu-system-x86 from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  else
    log "installing qemu-system-x86"
    apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
  fi
fi

if [ "$(qemu_major)" -lt 9 ]; then
  echo "install-prereqs: QEMU >= 9.0 is required (found: $(qemu-system-x86_64 --version 2>/dev/null | head -n1))." >&2
  echo "QEMU older than 9.0 loses dirty pages under TCG. On Debian 12 install it from bookworm-backports." >&2
  exit 1
fi
log "ready: $(qemu-system-x86_64 --version | head -n1)"
