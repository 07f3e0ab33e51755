#!/usr/bin/env bash
# Chaos for the docker compose stack: SIGKILLs the daemon, Kafka and MinIO at random while the
# producer runs, restarts each after a random outage, then stops the load, waits until the
# daemons and the partitioner have caught up, and runs `trstream audit`. Exit status: the
# audit's (0 = nothing missing, duplicated or unexpected; the DLQ holds exactly the invalid
# records).
#
#   tests/chaos/compose-chaos.sh                 # 20 rounds against a running (or new) stack
#   CHAOS_ROUNDS=50 CHAOS_SEED=7 tests/chaos/compose-chaos.sh
#   CHAOS_TARGETS="consumer" tests/chaos/compose-chaos.sh   # kill only daemons
#
# Settings (environment):
#   CHAOS_ROUNDS       kills to inject (default 20)
#   CHAOS_SEED         seed of the random choices; the same seed replays the same plan (default: $$)
#   CHAOS_TARGETS      services to pick from (default "consumer kafka minio")
#   CHAOS_MAX_WAIT     longest pause between kills, seconds (default 20)
#   CHAOS_MAX_DOWN     longest outage, seconds (default 15)
#   CHAOS_SETTLE       deadline for catching up after the load stops, seconds (default 600)
#   PROMETHEUS_PORT    where Prometheus answers on the host (default 9090, as in .env)
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

cd "$(dirname "$0")/../.."
rounds=${CHAOS_ROUNDS:-20}
seed=${CHAOS_SEED:-$$}
read -r -a targets <<<"${CHAOS_TARGETS:-consumer kafka minio}"
max_wait=${CHAOS_MAX_WAIT:-20}
max_down=${CHAOS_MAX_DOWN:-15}
settle=${CHAOS_SETTLE:-600}
prometheus="http://localhost:${PROMETHEUS_PORT:-9090}"
RANDOM=$seed

for n in "$rounds" "$max_wait" "$max_down" "$settle"; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "compose-chaos: expected a whole number, got '$n'" >&2; exit 2; }
done
for t in "${targets[@]}"; do
  case $t in consumer | kafka | minio) ;; *)
    echo "compose-chaos: CHAOS_TARGETS may name consumer, kafka and minio, not '$t'" >&2
    exit 2
    ;;
  esac
done
command -v docker >/dev/null || { echo "compose-chaos: docker is not installed" >&2; exit 2; }
command -v curl >/dev/null || { echo "compose-chaos: curl is not installed" >&2; exit 2; }

log() { printf '%s compose-chaos: %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# A whole number of seconds from 1 to $1, from the seeded generator.
draw() { echo $((RANDOM % $1 + 1)); }

# The value of a PromQL expression that yields one number; empty while Prometheus has none.
query() {
  curl -fsS --get "$prometheus/api/v1/query" --data-urlencode "query=$1" 2>/dev/null |
    sed -n 's/.*"value":\[[^,]*,"\([^"]*\)"\].*/\1/p'
}

# Waits until `$1` evaluates to exactly 0 on Prometheus, or $settle seconds pass.
wait_zero() {
  local deadline=$((SECONDS + settle)) v
  while ((SECONDS < deadline)); do
    v=$(query "$1")
    if [[ $v == 0 ]]; then return 0; fi
    sleep 5
  done
  log "gave up after ${settle}s waiting for $1 to reach 0 (last: ${v:-no answer})"
  return 1
}

log "seed $seed (replay with CHAOS_SEED=$seed); $rounds kills among: ${targets[*]}"
docker compose up -d --wait
declare -A kills=()

for ((i = 1; i <= rounds; i++)); do
  sleep "$(draw "$max_wait")"
  target=${targets[RANDOM % ${#targets[@]}]}
  down=$(draw "$max_down")
  if [[ $target == consumer ]]; then
    # One replica of the daemon, when it is scaled.
    mapfile -t replicas < <(docker compose ps -q consumer)
    if ((${#replicas[@]} == 0)); then
      log "no consumer is running; starting one"
      docker compose up -d consumer
      continue
    fi
    victim=${replicas[RANDOM % ${#replicas[@]}]}
    log "round $i: SIGKILL consumer replica ${victim:0:12}, down ${down}s"
    docker kill -s KILL "$victim" >/dev/null
    sleep "$down"
    docker start "$victim" >/dev/null
  else
    log "round $i: SIGKILL $target, down ${down}s"
    docker compose kill -s KILL "$target"
    sleep "$down"
    docker compose start "$target"
  fi
  kills[$target]=$((${kills[$target]:-0} + 1))
done

summary=""
for t in "${!kills[@]}"; do summary+=" $t=${kills[$t]}"; done
log "kills:${summary:- none}; stopping the producer and waiting for the daemons to catch up"
docker compose stop producer
docker compose up -d --wait consumer
wait_zero 'sum(trstream_consumer_lag_records) or vector(1)'
wait_zero 'sum(trstream_partitioner_lag_files) or vector(1)'

log "auditing topic, DLQ and lake"
status=0
docker compose run --rm consumer audit --raw || status=$?
if ((status == 0)); then
  log "audit clean after$summary kills (seed $seed)"
else
  log "audit NOT clean (exit $status) after$summary kills (seed $seed); the stack is left running for inspection"
fi
log "the producer is stopped; 'docker compose start producer' resumes the load"
exit "$status"
