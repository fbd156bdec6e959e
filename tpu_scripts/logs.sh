#!/usr/bin/env bash
# Streams the log of a run started by launch.sh from one worker (default: worker 0).
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << USAGE
Usage: logs.sh --name NAME --zone ZONE [--worker N] [--log-file PATH] [options]

Follows (tail -F) the run log on one worker; Ctrl-C stops following, not the run.
Worker 0 is process 0, the one that writes progress and reports.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone

Options:
  --worker N           which worker's log (default: 0)
  --log-file PATH      log path relative to $REMOTE_DIR, as given to launch.sh
                       (default: $DEFAULT_LOG_FILE)
  --lines N            lines of history to show first (default: 100)
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --dry-run            print the gcloud command without running it
  -h, --help           show this help
USAGE
}

WORKER=0
LOG_FILE="$DEFAULT_LOG_FILE"
LINES=100
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --worker)
      need_value "$@"
      WORKER="$2"
      shift 2
      ;;
    --log-file)
      need_value "$@"
      LOG_FILE="$2"
      shift 2
      ;;
    --lines)
      need_value "$@"
      LINES="$2"
      shift 2
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone
[[ "$WORKER" =~ ^[0-9]+$ ]] || usage_error "--worker must be a worker number (0, 1, ...), got '$WORKER'"
[[ "$LINES" =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, got '$LINES'"

tpu_ssh "$WORKER" "$(remote_script "cd $REMOTE_DIR" "tail -n $LINES -F $(shell_quote "$LOG_FILE")")"
