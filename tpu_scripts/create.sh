#!/usr/bin/env bash
# Creates a Cloud TPU VM (or a queued resource that becomes one) for jaxalign.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat << 'USAGE'
Usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [options] [-- GCLOUD_FLAGS...]

Creates a Cloud TPU VM with `gcloud compute tpus tpu-vm create`, or with
--queued a queued resource (`gcloud compute tpus queued-resources create`)
whose node gets the same NAME once capacity is granted.

Required:
  --name NAME               TPU VM (node) name; the other scripts take the same name
  --zone ZONE               zone with capacity for the type, e.g. us-central2-b (v4),
                            us-west4-a (v5e), us-east5-a (v5p)
  --accelerator-type TYPE   e.g. v4-8, v4-16, v5litepod-8, v5p-8, v6e-8; TPU v5e's
                            accelerator types are v5litepod-N, and v5e-N is passed
                            to gcloud as v5litepod-N

Options:
  --version RUNTIME         TPU software (runtime) version. Default by TYPE, per
                            Google's table for JAX and PyTorch:
                              v2-*, v3-*, v4-*       tpu-ubuntu2204-base
                              v5litepod-* (v5e)      v2-alpha-tpuv5-lite
                              v5p-*                  v2-alpha-tpuv5
                              v6e-*                  v2-alpha-tpuv6e
                            These are plain Ubuntu 22.04 images; setup.sh installs
                            Python 3.11, jax[tpu] and jaxalign on top.
  --project PROJECT         Google Cloud project (default: gcloud's configured one)
  --queued                  request a queued resource (waits for capacity instead of
                            failing); watch it with
                            `gcloud compute tpus queued-resources describe NAME --zone=ZONE`
                            (the command is printed with --project when one is given)
  --spot                    Spot capacity: cheaper, can be preempted at any time
  --dry-run                 print the gcloud command without running it
  -h, --help                show this help
  -- GCLOUD_FLAGS...        passed to gcloud unchanged (e.g. -- --network=my-net)

Example:
  bash tpu_scripts/create.sh --name jaxalign-v4 --zone us-central2-b --accelerator-type v4-16
USAGE
}

ACCELERATOR_TYPE=""
VERSION=""
QUEUED=0
SPOT=0
EXTRA=()

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --accelerator-type)
      need_value "$@"
      ACCELERATOR_TYPE="$2"
      shift 2
      ;;
    --version)
      need_value "$@"
      VERSION="$2"
      shift 2
      ;;
    --queued)
      QUEUED=1
      shift
      ;;
    --spot)
      SPOT=1
      shift
      ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    *)
      parse_common_option "$@" || usage_error "unknown option: $1"
      shift "$SHIFT"
      ;;
  esac
done

require_name_and_zone
require --accelerator-type "$ACCELERATOR_TYPE" "the TPU type and size, e.g. --accelerator-type v4-8"

# Google names TPU v5e accelerator types v5litepod-N; gcloud rejects v5e-N.
case "$ACCELERATOR_TYPE" in
  v5e-*)
    info "note: --accelerator-type $ACCELERATOR_TYPE is v5litepod-${ACCELERATOR_TYPE#v5e-} to gcloud"
    ACCELERATOR_TYPE="v5litepod-${ACCELERATOR_TYPE#v5e-}"
    ;;
esac

# default_runtime TYPE: the runtime version Google lists for JAX on that TPU generation.
default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

if [ -z "$VERSION" ]; then
  VERSION="$(default_runtime "$ACCELERATOR_TYPE")" ||
    usage_error "no default runtime version for accelerator type '$ACCELERATOR_TYPE'; pass --version"
fi

SPOT_FLAG=()
if [ "$SPOT" -eq 1 ]; then
  SPOT_FLAG=(--spot)
fi

if [ "$QUEUED" -eq 1 ]; then
  gcloud_run compute tpus queued-resources create "$NAME" "--node-id=$NAME" "--zone=$ZONE" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$VERSION" \
    ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  info "queued resource $NAME requested; the TPU VM exists once its state is ACTIVE:"
  info "  $(gcloud_hint compute tpus queued-resources describe "$NAME" "--zone=$ZONE")"
else
  gcloud_run compute tpus tpu-vm create "$NAME" "--zone=$ZONE" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION" \
    ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
fi
info "next: $(script_hint setup.sh)"
