#!/usr/bin/env bash
# Step 2 (reward model) sweep, as DeepSpeed-Chat's: run_single.sh for ZeRO-2 and ZeRO-3, each with and
# without CPU offload (4 runs), each into ./z<stage>_offload_<bool>/. A failed run is reported and the
# sweep goes on; the exit status is 1 if any failed.
#
# Usage: run_step2_sweep.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
failed=()
for z in 2 3; do
   for offload in true false; do
      name="z${z}_offload_${offload}"
      echo "=== $name"
      bash "$HERE/run_single.sh" "$z" "$offload" "$name" || failed+=("$name")
   done
done
if (( ${#failed[@]} )); then
   echo "failed: ${failed[*]}"
   exit 1
fi
