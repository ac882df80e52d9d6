#!/usr/bin/env bash
# The design note's workflow, end to end on the local site (`make demo` runs this after `make site`),
# as a real user of a centre: an unprivileged user (IOSEA_WF_DEMO_USER, default iosea-demo, created
# if missing) runs the site's CLI (/usr/local/bin/iosea-wf, installed by `make site`) through the
# site's Workflow Manager service. It validates against both sites, starts a session (two NFS
# ephemeral services), runs step_A and step_B with their data movers, shows the status, stops, and
# shows what reached the tiers: every job, file and session is the user's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
demo_user=${IOSEA_WF_DEMO_USER:-iosea-demo}

if [ "$(id -u)" = 0 ]; then
  # Root is not a user of this product: root only makes the user and hands over.
  if ! id "$demo_user" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$demo_user"
    echo "made the user $demo_user"
  fi
  home=$(getent passwd "$demo_user" | cut -d: -f6)
  work="$home/demo"
  rm -rf "$work" && mkdir -p "$work"
  cp "$here/sample-wdf.yaml" "$here/My_Step_A" "$here/My_Step_B" "$work/"
  chown -R "$demo_user:" "$work"
  cd "$work"
  exec runuser -u "$demo_user" -- env -i HOME="$home" USER="$demo_user" LOGNAME="$demo_user" \
    LANG=C.UTF-8 TERM="${TERM:-dumb}" PATH=/usr/local/bin:/usr/bin:/bin \
    bash "$here/demo.sh"
fi

# From here on: the demo user, in their own work directory, with the site's CLI only.
work="$HOME/demo"
cd "$work"
session="demo-$(date +%Y%m%d-%H%M%S)"
# Under /home: a namespace root of both sites (the example site has no /var/tmp root).
data="$HOME/$session"
wdf="$work/sample-wdf.yaml"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Datasets: two namespaces with gauges and input files"
mkdir -p "$data/ns1/gauges" "$data/ns1/input" "$data/ns2/gauges" "$data/ns2/input"
for ns in ns1 ns2; do
  for i in 1 2 3; do head -c 100000 /dev/urandom > "$data/$ns/gauges/g$i.hdf5"; done
  for i in 1 2; do seq 1 $((i * 1000)) > "$data/$ns/input/in$i.txt"; done
done
find "$data" -type f | sort

say "Validate the design note's WDF against both sites"
run iosea-wf validate WORKFLOW="$wdf" NS1="$data/ns1" NS2="$data/ns2"
run iosea-wf validate --site "$top/inventories/example" WORKFLOW="$wdf" NS1="$data/ns1" NS2="$data/ns2"

say "Start the session as $(id -un), through the site's Workflow Manager service"
run iosea-wf start WORKFLOW="$wdf" SESSION="$session" NS1="$data/ns1" NS2="$data/ns2"
url=$(iosea-wf status SESSION="$session" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["services"][0]["url"])')
say "A real NFS client reads ES1 through its URL"
# The URL carries the export's port as a query string (nfs://HOST/EXPORT?nfsport=N): a path inside
# the export goes before the query, not after it.
base=${url%%\?*}
query=${url#"$base"}
run nfs-ls "$base/gauges$query"

say "Run step_A (ES1 read-only) and wait"
run iosea-wf run SESSION="$session" STEP=step_A --wait
say "Run step_B (ES2 read-write, copy to flash before, move gauges to tape after) and wait"
run iosea-wf run SESSION="$session" STEP=step_B --wait

say "Status"
run iosea-wf status SESSION="$session"
say "What the steps printed"
for f in $(ls -t My_Step_A-*.out | head -1) $(ls -t My_Step_B-*.out | head -1); do echo "--- $f"; cat "$f"; rm -f "$f"; done

say "Stop: every service torn down"
run iosea-wf stop SESSION="$session"
run iosea-wf list --all

tiers=$(iosea-wf show tiers --json | python3 -c 'import json,sys; print(" ".join(t["name"]+"="+t["path"] for t in json.load(sys.stdin)["tiers"]))')
say "Tiers after the run (flash: copied by step_start; tape: moved by step_stop)"
for t in $tiers; do
  name=${t%%=*}; path=${t#*=}
  # A session's tier directory is NAME.ID (its name, then the start of its id).
  for dir in "$path/$(id -un)/$session".*/; do
    [ -d "$dir" ] && { echo "$name: $dir"; (cd "$dir" && find . -type f -printf '%u %p\n' | sort -k2); }
  done
done
echo "ES2 gauges left in the namespace (moved to tape, so none):"
ls "$data/ns2/gauges"
