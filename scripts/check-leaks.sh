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
if [ $leaks -eq 0 ]; then echo "no leaks: no QEMU process, no tern-* namespace left"; fi
exit $leaks
