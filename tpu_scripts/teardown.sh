#!/usr/bin/env bash
# Deletes a Cloud TPU VM, or the queued resource that holds it.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << USAGE
Usage: teardown.sh --name NAME --zone ZONE [--queued] [--yes] [options]

Deletes the TPU VM NAME (gcloud compute tpus tpu-vm delete) or, with --queued,
the queued resource NAME and its TPU VM (gcloud compute tpus queued-resources
delete --force). Everything on the workers' disks goes with it: keep run
outputs in gs:// (run.output_dir) or copy them off first. Asks for
confirmation unless --yes.

Required:
  --name NAME          TPU VM (or queued resource) name
  --zone ZONE          its zone

Options:
  --queued             delete the queued resource made by create.sh --queued
  --yes                do not ask for confirmation
  --project PROJECT    Google Cloud project (default: gcloud's configured one)
  --dry-run            print the gcloud command without running it (never asks)
  -h, --help           show this help
USAGE
}

QUEUED=0
YES=0
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --queued)
      QUEUED=1
      shift
      ;;
    --yes | -y)
      YES=1
      shift
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone

if [ "$QUEUED" -eq 1 ]; then
  WHAT="queued resource $NAME and its TPU VM"
else
  WHAT="TPU VM $NAME"
fi
if [ "$YES" -eq 0 ] && [ "$DRY_RUN" -eq 0 ]; then
  printf 'Delete %s in zone %s? Everything on its disks is lost. [y/N] ' "$WHAT" "$ZONE" >&2
  ANSWER=""
  read -r ANSWER || true
  case "$ANSWER" in
    y | Y | yes | YES) ;;
    *) die "not deleted (answer y to delete, or pass --yes)" ;;
  esac
fi

# gcloud's own prompt is answered by the one above (--quiet).
if [ "$QUEUED" -eq 1 ]; then
  gcloud_run compute tpus queued-resources delete "$NAME" "--zone=$ZONE" --force --quiet
else
  gcloud_run compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" --quiet
fi
