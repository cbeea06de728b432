#!/usr/bin/env bash
# Deploy a new version of the bug tracker together with the seed plan, zero downtime.
#
#   upgrade -> expand -> backfill -> check-deploy NEW -> (deploy NEW) -> switch
#   -> gate contract --wait -> contract
#
# `phasegate upgrade` replaces the `alembic upgrade head` a deploy would run: it applies every
# revision that is safe now (other teams' changes, phases already done) and stops before the
# plan's own revisions, which the phase steps after it run behind their gates. (A plain
# `alembic upgrade head` refuses a plan revision whose phase phasegate has not run.)
#
# Every step is a phasegate command whose exit code decides what happens next:
#   0 go on · 1 refused (a gate, or check-deploy said no): stop, nothing is half-done ·
#   2 usage or plan error: fix the pipeline · 3 failure: fix the cause and re-run this
#   script (finished phases are skipped, a failed one resumes) · 4 another phasegate
#   is running this plan: re-run later.
#
# Settings (environment):
#   PHASEGATE_DATABASE_URL  the target database (or DATABASE_URL, or alembic.ini)
#   CURRENT_VERSION         the version running now, e.g. 1.4.2 (the pipeline knows it)
#   NEW_VERSION             the version being rolled out, e.g. 2.0.0
#   DEPLOY_COMMAND          the command that rolls NEW_VERSION out (default: a message)
#   GATE_WAIT               how long to wait for the old version to drain (default 15m)
#   PLAN                    default plans/bug_root_cause.yaml
#   PHASEGATE               how to run phasegate (default: phasegate)
set -euo pipefail

: "${CURRENT_VERSION:?set CURRENT_VERSION, the version running now}"
: "${NEW_VERSION:?set NEW_VERSION, the version to roll out}"
PLAN=${PLAN:-plans/bug_root_cause.yaml}
GATE_WAIT=${GATE_WAIT:-15m}
DEPLOY_COMMAND=${DEPLOY_COMMAND:-"echo 'roll out bugtracker $NEW_VERSION here'"}
read -r -a PHASEGATE <<< "${PHASEGATE:-phasegate}"

step() {
  local what=$1
  shift
  echo "==> $what"
  local code=0
  "${PHASEGATE[@]}" "$@" || code=$?
  case $code in
    0) return 0 ;;
    1) echo "deploy stopped: '$what' was refused (see above); nothing is half-done" >&2 ;;
    2) echo "deploy stopped: '$what' was called wrongly or the plan is invalid" >&2 ;;
    4) echo "deploy stopped: another phasegate is running this plan; re-run later" >&2 ;;
    *) echo "deploy stopped: '$what' failed; fix the cause and re-run this script" >&2 ;;
  esac
  exit "$code"
}

step "upgrade (every revision that is safe now; the plan's phases follow)" \
  upgrade --yes
step "expand (additive schema, old code keeps working)" \
  expand "$PLAN" --live-version "$CURRENT_VERSION" --yes
step "backfill (sync triggers + batched copy)" \
  backfill "$PLAN" --live-version "$CURRENT_VERSION" --yes
step "may $NEW_VERSION be deployed now?" \
  check-deploy --app-version "$NEW_VERSION" "$PLAN"

echo "==> deploy $NEW_VERSION"
bash -c "$DEPLOY_COMMAND" || {
  echo "deploy stopped: rolling out $NEW_VERSION failed; the schema is still fine for" \
    "$CURRENT_VERSION (backfill done): fix the rollout and re-run this script" >&2
  exit 3
}

step "switch (validate and tighten)" \
  switch "$PLAN" --live-version "$NEW_VERSION" --yes
step "wait until no old version is live (up to $GATE_WAIT)" \
  gate "$PLAN" --phase contract --live-version "$NEW_VERSION" --wait "$GATE_WAIT"
step "contract (drop what the old version needed)" \
  contract "$PLAN" --live-version "$NEW_VERSION" --yes
echo "==> done: bugtracker $NEW_VERSION is live and the plan is complete"
