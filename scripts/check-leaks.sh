#!/usr/bin/env bash
# Fails if tests left a QEMU process or a lab network namespace behind.
set -u
leaks=0
if pgrep -a qemu-system >/dev/null 2>&1; then
  echo "LEAK: QEMU processes still running:" >&2
  pgrep -a qemu-system >&2
  leaks=1
fi
if ip netns list 2>/dev/null | grep -q '^tern-'; then
  echo "LEAK: lab namespaces still present:" >&2
  ip netns list | grep '^tern-' >&2
  leaks=1
fi
tmp=$(find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'tern-*' 2>/dev/null)
if [ -n "$tmp" ]; then
  echo "LEAK: temp dirs still present:" >&2
  echo "$tmp" >&2
  leaks=1
fi
if [ $leaks -eq 0 ]; then echo "no leaks: no QEMU process, no tern-* namespace, no tern-* temp dir left"; fi
exit $leaks
