#!/usr/bin/env bash
# Fails if the tests left a QEMU process, a lab network namespace or a tern temp dir behind.
#
#   scripts/check-leaks.sh --before FILE   record what already exists (not the tests' doing)
#   scripts/check-leaks.sh --after FILE    fail on anything new since --before
#   scripts/check-leaks.sh                 fail on anything at all
set -u

inventory() {
  # -f: tern names its QEMUs (`-name ...,process=tern-guest`), so the process name is not
  # qemu-system-*; match the command line.
  pgrep -af "^[^ ]*qemu-system" 2>/dev/null | sed 's/^/qemu: /'
  ip netns list 2>/dev/null | awk '{print $1}' | grep '^tern-' | sed 's/^/netns: /'
  find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'tern-*' 2>/dev/null | sed 's/^/tmp: /'
}

case "${1:-}" in
  --before)
    inventory | sort > "$2"
    exit 0
    ;;
  --after)
    new=$(comm -13 "$2" <(inventory | sort))
    ;;
  *)
    new=$(inventory)
    ;;
esac

if [ -n "$new" ]; then
  echo "LEAK: the tests left these behind:" >&2
  echo "$new" >&2
  exit 1
fi
echo "no leaks: no QEMU process, no tern-* namespace, no tern-* temp dir left"
