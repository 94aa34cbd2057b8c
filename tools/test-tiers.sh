#!/usr/bin/env bash
# `make test`: every tier in order (lint+unit, then integration, then image), stopping at the
# first tier that fails, so a broken lint costs two minutes rather than half an hour. Prints
# each tier's duration and the total; pytest arguments come from PYTEST_ARGS.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${VENV:-$here/.venv}/bin/python
[ -x "$py" ] || { echo "test-tiers: no venv at $py (run make setup)" >&2; exit 1; }
cd "$here" || exit 1

# What the image tier builds (the appliance kernel, a few CPU-minutes of compiling on a fresh
# machine; make images; the cloud-init guest; the demo's hypervisor versions: ~9 minutes of the
# image tier on a fresh machine) is built niced in the background while the first tiers run,
# which leave a core idle most of the time (hatchery_lab.prebuild); the image tier waits for
# it, then finds every build cached by its inputs.
# (Not with PYTEST_ARGS: a narrowed run may never reach the image tier.)
prebuild_log=build/prebuild.log
prebuild_pid=""
if [ -z "${PYTEST_ARGS:-}" ]; then
  mkdir -p build
  # Its own session, so its own process group: an early failure stops the builds (make,
  # every cc1, mkosi) with us. A new session is also a new scheduling autogroup, whose weight
  # nice alone does not lower (the compile took half the CPU from the tests that way):
  # the group is niced too, from inside it.
  # shellcheck disable=SC2016  # $0 is expanded by the inner shell
  setsid sh -c 'echo 19 > /proc/self/autogroup 2>/dev/null; exec nice -n 19 "$0" -m hatchery_lab.prebuild' \
    "$py" > "$prebuild_log" 2>&1 &
  prebuild_pid=$!
  trap '[ -n "$prebuild_pid" ] && kill -- "-$prebuild_pid" 2>/dev/null' EXIT
fi

tiers=("lint+unit" "integration" "image")
markers=("not integration and not image" "integration" "image")
durations=()
status=0
started=$SECONDS
for i in "${!tiers[@]}"; do
  printf '\033[1m==> tier %s\033[0m\n' "${tiers[$i]}"
  t0=$SECONDS
  if [ "${tiers[$i]}" = image ] && [ -n "$prebuild_pid" ]; then
    # A failed build ahead is not fatal: the test that needs it builds (and reports) it again.
    waited=$SECONDS
    wait "$prebuild_pid" || echo "test-tiers: a build ahead failed (see $prebuild_log)"
    grep '^prebuild: ' "$prebuild_log" | grep -v ' \.\.\.$'
    echo "test-tiers: waited $(( SECONDS - waited )) s for the builds ahead"
    prebuild_pid=""
  fi
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words by design
  "$py" -m pytest -m "${markers[$i]}" --durations=10 ${PYTEST_ARGS:-}
  status=$?
  durations+=("$(( SECONDS - t0 ))")
  # pytest exit 5: no test selected (e.g. PYTEST_ARGS='-k tftp' in one tier): not a failure
  if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then break; fi
  status=0
done

printf '\n\033[1m==> test tiers\033[0m\n'
for i in "${!tiers[@]}"; do
  if [ "$i" -lt "${#durations[@]}" ]; then
    d=${durations[$i]}
    outcome=passed
    if [ "$i" -eq $(( ${#durations[@]} - 1 )) ] && [ "$status" -ne 0 ]; then outcome="FAILED ($status)"; fi
    printf '  %-12s %4dm%02ds  %s\n' "${tiers[$i]}" $((d / 60)) $((d % 60)) "$outcome"
  else
    printf '  %-12s %8s  not run (an earlier tier failed)\n' "${tiers[$i]}" "-"
  fi
done
total=$(( SECONDS - started ))
printf '  %-12s %4dm%02ds\n' "total" $((total / 60)) $((total % 60))
exit "$status"
