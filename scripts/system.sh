# scripts/system.sh: starts the whole system for the demo and the benchmarks. Source it under
# tests/with-postgres (SAGA_TEST_PGURL names the cluster), with $build set, then call
# system_start; system_stop (also run on EXIT by the caller's trap) stops what it started.
# Sets: orch (the orchestrator's database URL), base (the cluster URL without a database),
# brokers, logdir, services, pids, and SYS_PID_<name> for each process.

services=(inventory payment orders shipping)
pids=()

system_wait_log() { # file needle seconds
    for _ in $(seq 1 $(($3 * 10))); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "system: timed out waiting for \"$2\" in $1:" >&2
    tail -5 "$1" >&2
    return 1
}

# The broker last, as Kafka outlives the services in production: a consumer's close waits for
# the group coordinator (a participant stopped together with the broker once hung in it for
# good; their close is bounded at 5 s since, but a clean stop needs no bound).
system_stop() {
    local p
    for p in "${pids[@]}"; do
        [ "$p" = "${SYS_PID_broker:-}" ] || kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        [ "$p" = "${SYS_PID_broker:-}" ] || wait "$p" 2>/dev/null || true
    done
    if [ -n "${SYS_PID_broker:-}" ]; then
        kill -TERM "$SYS_PID_broker" 2>/dev/null || true
        wait "$SYS_PID_broker" 2>/dev/null || true
        SYS_PID_broker=
    fi
    pids=()
}

system_start() { # [extra orchestrator env...]
    logdir=$(mktemp -d /tmp/saga-system.XXXXXX)
    base=${SAGA_TEST_PGURL%/postgres}
    for db in orchestrator "${services[@]}"; do
        psql -q "$SAGA_TEST_PGURL" -c "CREATE DATABASE $db"
    done
    orch="$base/orchestrator"

    exec {broker_out}< <(exec "$build/tools/dev-broker" 2>"$logdir/broker.err")
    SYS_PID_broker=$!
    pids+=($SYS_PID_broker)
    read -r -t 30 line <&"$broker_out" || { echo "dev-broker did not start" >&2; return 1; }
    brokers=${line#bootstrap=}
    # The mock broker keeps a consumer group rebalancing for session.timeout.ms after a
    # member leaves; a short session keeps restarts quick.
    export KAFKA_SESSION_TIMEOUT_MS=6000

    env SAGA_DATABASE_URL="$orch" SAGA_KAFKA_BROKERS="$brokers" SAGA_DEFINITIONS_DIR=sagas \
        SAGA_ADMIN_ADDR=127.0.0.1:0 "$@" "$build/orchestrator/saga-orchestrator" \
        >"$logdir/orchestrator.log" 2>&1 &
    SYS_PID_orchestrator=$!
    pids+=($SYS_PID_orchestrator)
    system_wait_log "$logdir/orchestrator.log" "saga-orchestrator started" 30 || return 1

    for s in "${services[@]}"; do
        PARTICIPANT_SERVICE=$s PARTICIPANT_DATABASE_URL="$base/$s" PARTICIPANT_KAFKA_BROKERS=$brokers \
            "$build/examples/example-participant" >"$logdir/$s.log" 2>&1 &
        pids+=($!)
        eval "SYS_PID_$s=$!"
    done
    for s in "${services[@]}"; do
        for _ in $(seq 1 300); do
            psql -qAt "$base/$s" -c "SELECT to_regclass('$s.outbox_dead_letters') IS NOT NULL" 2>/dev/null | grep -q t && break
            sleep 0.1
        done
    done

    {
        echo '{"sources": ['
        echo "  {\"database_url\": \"$orch\", \"tables\": [\"saga.outbox\"]}"
        for s in "${services[@]}"; do
            echo "  ,{\"database_url\": \"$base/$s\", \"tables\": [\"$s.outbox\"]}"
        done
        echo ']}'
    } >"$logdir/relay.json"
    RELAY_CONFIG="$logdir/relay.json" RELAY_KAFKA_BROKERS=$brokers RELAY_ADMIN_ADDR=127.0.0.1:0 \
        "$build/relay/outbox-relay" >"$logdir/relay.log" 2>&1 &
    SYS_PID_relay=$!
    pids+=($SYS_PID_relay)
    system_wait_log "$logdir/relay.log" "leading" 30 || return 1
}

# Waits (at most timeout_seconds) until no saga is pending, running or compensating; non-zero
# on timeout. Asked with the statuses of unfinished sagas (an index range: a NOT IN of the
# finished ones read the whole table at every poll), from one session polling every 50 ms
# inside the server and committing between polls (a psql process every 0.2 s took CPU from
# the system that saga-bench measures).
system_wait_finished() { # timeout_seconds
    psql -qAt -v ON_ERROR_STOP=1 "$orch" -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp();
    BEGIN
        WHILE EXISTS (SELECT 1 FROM saga.instances
                       WHERE status IN ('pending', 'running', 'compensating')) LOOP
            IF clock_timestamp() - t0 > interval '$1 s' THEN
                RAISE EXCEPTION 'sagas not finished after $1 s';
            END IF;
            PERFORM pg_sleep(0.05);
            COMMIT; -- no snapshot held across the wait (it would hold back vacuum)
        END LOOP;
    END \$\$" >/dev/null
}
