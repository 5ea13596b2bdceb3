#!/usr/bin/env bash
# A standalone coordinator, for clusters where several jobs share one, or where it should
# outlive the jobs. Ranks find it through SHARDBALANCE_COORDINATOR and authenticate with the
# same token:
#   BIND=tcp://10.0.0.5:5555 launch/coordinator.sh
#   export SHARDBALANCE_COORDINATOR=tcp://10.0.0.5:5555 SHARDBALANCE_TOKEN_FILE=$PWD/shardbalance.token
# The token file is created (mode 600) if it does not exist. The token only authorises creating
# runs and encrypts the connection (CURVE, key pair derived from it); each job binds its run to
# its own run key, so jobs sharing the token cannot steer each other's runs. A restart with the
# same LOG resumes from the journal. Bounds (refused beyond, see `shardbalance coordinator -h`):
#   MAX_RANKS=16384 MAX_RUNS=256 JOURNAL_MAX_MB=256 launch/coordinator.sh
set -euo pipefail

: "${BIND:?set BIND=tcp://IP:PORT, an address of this host the ranks can reach}"
LOG=${LOG:-shardbalance-coordinator.jsonl}
TOKEN_FILE=${TOKEN_FILE:-shardbalance.token}

if [ ! -s "$TOKEN_FILE" ]; then
    (umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
    echo "created token file $TOKEN_FILE; give it to the ranks (SHARDBALANCE_TOKEN_FILE)" >&2
fi

exec shardbalance coordinator --bind "$BIND" --log "$LOG" --token-file "$TOKEN_FILE" \
    --max-ranks "${MAX_RANKS:-16384}" --max-runs "${MAX_RUNS:-256}" \
    --journal-max-mb "${JOURNAL_MAX_MB:-256}" "$@"
