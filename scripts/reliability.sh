#!/usr/bin/env bash
# Regenerates docs/reliability.md: runs the crash-safety, storage-fault, STS-outage and security
# tests, the soak test (TBOT_SOAK_SECS, default 180) and, when TBOT_FUZZ_SECS > 0 and nightly with
# cargo-fuzz is installed, each fuzz target for that long; then writes the page from their results.
#   scripts/reliability.sh                      # everything but fuzzing (about 6 minutes here)
#   TBOT_FUZZ_SECS=600 scripts/reliability.sh   # plus ten minutes per fuzz target
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
export TBOT_REPORT_DIR="$out"
tests=(
  "crash_safety sigkill_at_random_moments_never_damages_the_storage_or_frees_a_token"
  "crash_safety a_crash_between_the_issuers_answer_and_its_saving_is_recovered"
  "crash_safety a_crash_inside_a_rejoin_with_a_new_token_is_recovered_without_locking_the_bot"
  "crash_safety a_full_or_read_only_storage_is_a_condition_and_serving_goes_on"
  "iam_join with_sts_gone_an_iam_agent_serves_its_cache_reports_stalled_backs_off_and_recovers"
  "workload_api a_process_in_a_systemd_service_gets_its_svid_and_others_are_denied"
  "live_reload the_admin_api_refuses_another_uid"
  "workload_api private_keys_never_appear_in_debug_logs_or_tbotctl_output"
  "diff_golden a_token_edit_rejoins_and_masks_the_secret_unless_asked"
  "iam_join a_wrong_account_or_an_arn_that_does_not_match_is_refused_naming_the_check"
  "fuzz_regressions the_loader_survives_every_recorded_input"
)
: > "$out/tests.tsv"
for entry in "${tests[@]}"; do
  read -r binary name <<< "$entry"
  start=$(date +%s%N)
  if cargo test -q --test "$binary" "$name" -- --exact --nocapture > "$out/$name.log" 2>&1; then
    result=passed
  else
    result=FAILED
  fi
  tenths=$(( ($(date +%s%N) - start) / 100000000 ))
  printf '%s\t%s\t%s\t%d.%d\n' "$binary" "$name" "$result" $((tenths / 10)) $((tenths % 10)) >> "$out/tests.tsv"
  echo "$result: $binary::$name"
done
scripts/soak.sh > "$out/soak.log" 2>&1 || echo "the soak test FAILED: see $out/soak.log"
if [[ "${TBOT_FUZZ_SECS:-0}" -gt 0 ]]; then
  for target in load template spiffe_id; do
    mkdir -p "fuzz/corpus/$target"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$TBOT_FUZZ_SECS" > "$out/fuzz-$target.log" 2>&1 || echo "fuzzing $target FAILED"
  done
fi
python3 scripts/reliability_page.py "$out" > docs/reliability.md
echo "wrote docs/reliability.md (raw results in $out)"
