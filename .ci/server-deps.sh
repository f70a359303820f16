# Sourced by .ci/run (and usable by hand: `. .ci/server-deps.sh`): installs and starts what
# the stitch-server test suite needs, idempotently, and exports STITCH_TEST_DATABASE_URL.
#   - PostgreSQL (a local cluster, a `stitch_test` role and database)
#   - Chromium and chromedriver (dashboard tests in headless Chromium)
# Runs as root on Debian 12. Safe to source repeatedly; does not `exit` (it is sourced).
stitch_server_deps() {
    local need=()
    command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
    [ -x /usr/bin/chromium ] || need+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
    if [ "${#need[@]}" -gt 0 ]; then
        echo "server-deps: installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
            { echo "server-deps: apt-get install failed" >&2; return 1; }
    fi
    # Start the (first) cluster; create one if the package left none.
    local ver
    ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
    if [ -z "$ver" ]; then echo "server-deps: no PostgreSQL found" >&2; return 1; fi
    if ! pg_lsclusters -h 2>/dev/null | grep -q .; then
        pg_createcluster "$ver" main >/dev/null || return 1
    fi
    local cluster
    cluster=$(pg_lsclusters -h | head -1 | awk '{print $1" "$2}')
    # After an unclean stop (a VM reset) PostgreSQL fsyncs every file of the data directory
    # before it accepts connections; syncfs does the same in one call per file system.
    local conf
    conf=$(pg_lsclusters -h | head -1 | awk '{print "/etc/postgresql/"$1"/"$2"/conf.d/stitch-test.conf"}')
    if [ -d "$(dirname "$conf")" ] && [ ! -f "$conf" ]; then
        echo "recovery_init_sync_method = syncfs" >"$conf"
    fi
    if ! pg_lsclusters -h | head -1 | grep -q online; then
        # shellcheck disable=SC2086
        pg_ctlcluster $cluster start -- -t 600 || { echo "server-deps: cannot start PostgreSQL $cluster" >&2; return 1; }
    fi
    local port
    port=$(pg_lsclusters -h | head -1 | awk '{print $3}')
    local i
    for i in $(seq 1 30); do
        su postgres -c "psql -p $port -qAtc 'select 1'" >/dev/null 2>&1 && break
        sleep 0.5
    done
    su postgres -c "psql -p $port -qAtc \"select 1 from pg_roles where rolname='stitch_test'\"" | grep -q 1 ||
        su postgres -c "psql -p $port -qc \"create role stitch_test login password 'stitch_test'\"" >/dev/null
    su postgres -c "psql -p $port -qAtc \"select 1 from pg_database where datname='stitch_test'\"" | grep -q 1 ||
        su postgres -c "createdb -p $port -O stitch_test stitch_test" >/dev/null
    export STITCH_TEST_DATABASE_URL="postgres://stitch_test:stitch_test@127.0.0.1:$port/stitch_test"
    echo "server-deps: STITCH_TEST_DATABASE_URL=$STITCH_TEST_DATABASE_URL"
    export STITCH_CHROMEDRIVER="${STITCH_CHROMEDRIVER:-$(command -v chromedriver)}"
    export STITCH_CHROMIUM="${STITCH_CHROMIUM:-/usr/bin/chromium}"
}
stitch_server_deps
