#!/usr/bin/env bash
# Copies a run config to every worker of a Cloud TPU VM.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << USAGE
Usage: copy_config.sh --name NAME --zone ZONE --config FILE [options]

Copies FILE to $REMOTE_DIR/configs/<file name> on every worker (--worker=all),
so that launch.sh --config configs/<file name> finds it on all hosts.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone
  --config FILE        a local YAML config, e.g. configs/spa_zephyr7b_ultrafeedback.yaml

Options:
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --dry-run            print the gcloud commands without running them
  -h, --help           show this help
USAGE
}

CONFIG=""
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --config)
      need_value "$@"
      CONFIG="$2"
      shift 2
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone
require --config "$CONFIG" "the local config file to copy, e.g. --config configs/demo.yaml"
[ -f "$CONFIG" ] || die "--config $CONFIG: no such file"

BASE="$(basename "$CONFIG")"
tpu_ssh all "$(remote_script "mkdir -p $REMOTE_DIR/configs")"
tpu_scp "$CONFIG" "jaxalign/configs/$BASE"
info "next: $(script_hint launch.sh --config "configs/$BASE")"
