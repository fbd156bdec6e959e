#!/usr/bin/env bash
# Stops the run started by launch.sh on every worker.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << USAGE
Usage: stop.sh --name NAME --zone ZONE [--log-file PATH] [options]

Sends SIGTERM to the run launch.sh started on every worker (--worker=all),
found through the pid file next to its log. A rerun of the same launch.sh
command resumes from the last finished stage.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone

Options:
  --log-file PATH      log path relative to $REMOTE_DIR, as given to launch.sh
                       (default: $DEFAULT_LOG_FILE)
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --dry-run            print the gcloud command without running it
  -h, --help           show this help
USAGE
}

LOG_FILE="$DEFAULT_LOG_FILE"
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --log-file)
      need_value "$@"
      LOG_FILE="$2"
      shift 2
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone

PID="$(shell_quote "$LOG_FILE.pid")"
tpu_ssh all "$(remote_script \
  "cd $REMOTE_DIR" \
  "if [ -f $PID ] && kill \"\$(cat $PID)\" 2> /dev/null; then echo \"\$(hostname): stopped pid \$(cat $PID)\"; else echo \"\$(hostname): no run going\"; fi" \
  "rm -f $PID")"
