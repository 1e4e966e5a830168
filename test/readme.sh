#!/usr/bin/env bash
# readme_block MARKER: the fenced block (```...```) that follows the first line of
# README.md containing MARKER, printed as it stands.  The scenario scripts run
# the README's blocks verbatim through this, so the README cannot drift.
readme_block() {
  local block
  block=$(awk -v m="$1" 'state == 0 && index($0, m) { state = 1; next }
                         state == 1 && /^```/ { state = 2; next }
                         state == 2 && /^```/ { exit }
                         state == 2 { print }' "${ROOT:?}/README.md")
  if [ -z "$block" ]; then echo "readme_block: no block after \"$1\" in README.md" >&2; return 1; fi
  printf '%s\n' "$block"
}
