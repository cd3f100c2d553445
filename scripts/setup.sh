#!/usr/bin/env bash
# Set up a Debian machine for runplane development and CI; safe to run again (it then takes a second).
#
#   1. apt: nats-server, postgresql and chromium (and a Python >= 3.11 with venv), only when missing
#   2. PostgreSQL answering on 127.0.0.1:5432 as `postgresql://postgres@127.0.0.1:5432/test`:
#      starts (or creates) the cluster on port 5432; on a fresh Debian install, where 127.0.0.1 asks
#      for a password (scram-sha-256) that the postgres role does not have, it prepends
#      `host all all 127.0.0.1/32 trust` (and ::1/128) to pg_hba.conf, marked "runplane:" — loopback
#      only, for a development/CI machine; then creates database `test` when missing.
#      Skipped when RUNPLANE_TEST_POSTGRES_URL points the tests elsewhere.
#   3. .venv with `pip install -c constraints.txt -e '.[server,dev]'` (the exact versions CI tests),
#      redone only when pyproject.toml, constraints.txt or the set of top-level packages under sdk/
#      and services/ changed (the editable finder maps top-level names).
#   4. buf from npm (node_modules/.bin/buf), when missing or another version.
#   Then clients/node (Node >= 20): npm ci and npm run build (skipped with a warning without node).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUF_VERSION=1.75.0
PG_PORT=5432
PG_DATABASE=test

step() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: warning: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null && SUDO=(sudo) || warn "not root and no sudo: installs may fail"
fi

apt_updated=0
apt_install() {
    if [[ $apt_updated -eq 0 ]]; then
        "${SUDO[@]}" apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "$@" \
        >/tmp/runplane-apt.log 2>&1 || { cat /tmp/runplane-apt.log >&2; die "apt-get install $* failed"; }
}

# Prints a python with version >= 3.11 and a working venv module, if any.
find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# --- 1. system packages ---------------------------------------------------------------------------
missing=()
command -v nats-server >/dev/null || [[ -x /usr/sbin/nats-server ]] || missing+=(nats-server)
# The dashboard's browser tests drive Debian's chromium through Playwright (never its own download).
command -v chromium >/dev/null || [[ -x /usr/bin/chromium ]] || missing+=(chromium)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && command -v psql >/dev/null \
    || missing+=(postgresql postgresql-client)
if [[ ! -x .venv/bin/python ]] && ! find_python >/dev/null; then
    missing+=(python3 python3-venv)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    step "[1/4] installing ${missing[*]} (apt)"
    apt_install "${missing[@]}"
else
    step "[1/4] nats-server, postgresql, chromium: present"
fi

# --- 2. PostgreSQL --------------------------------------------------------------------------------
pg_url="postgresql://postgres@127.0.0.1:${PG_PORT}"
pg_sql() { psql "$pg_url/$1" -w -X -q -t -A -v ON_ERROR_STOP=1 -c "$2"; }

if [[ -n ${RUNPLANE_TEST_POSTGRES_URL:-} ]]; then
    step "[2/4] postgresql: RUNPLANE_TEST_POSTGRES_URL is set, leaving local PostgreSQL alone"
else
    cluster=$(pg_lsclusters --no-header 2>/dev/null | awk -v port="$PG_PORT" '$3 == port {print $1, $2; exit}')
    if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
        if [[ -z $cluster ]]; then
            # Debian's install makes "main", on the next free port when 5432 was taken then;
            # other clusters are left as they are.
            name=main
            [[ -z $(pg_lsclusters --no-header 2>/dev/null) ]] || name=runplane
            version=$(ls /usr/lib/postgresql | sort -V | tail -1)
            step "[2/4] postgresql: creating cluster $version/$name on port $PG_PORT"
            "${SUDO[@]}" pg_createcluster --port "$PG_PORT" "$version" "$name" >/dev/null
            cluster="$version $name"
        fi
        step "[2/4] postgresql: starting cluster $cluster"
        # shellcheck disable=SC2086  # "$version $name"
        "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect $cluster start
        for _ in $(seq 150); do
            pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
            sleep 0.2
        done
        pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL did not come up on 127.0.0.1:$PG_PORT"
    fi
    if ! pg_sql postgres 'select 1' >/dev/null 2>&1; then
        [[ -n $cluster ]] || die "cannot log in as postgres on 127.0.0.1:$PG_PORT and no local cluster to configure"
        hba="/etc/postgresql/${cluster// //}/pg_hba.conf"
        [[ -f $hba ]] || die "no $hba to configure"
        step "[2/4] postgresql: trusting loopback connections in $hba"
        tmp=$(mktemp)
        {
            echo '# runplane: trust loopback connections (development/CI machine), see scripts/setup.sh'
            echo 'host all all 127.0.0.1/32 trust'
            echo 'host all all ::1/128 trust'
            "${SUDO[@]}" cat "$hba"
        } >"$tmp"
        "${SUDO[@]}" cp "$tmp" "$hba" # cp onto the file keeps its owner and mode
        rm -f "$tmp"
        # shellcheck disable=SC2086
        "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect $cluster reload
        for _ in $(seq 50); do
            pg_sql postgres 'select 1' >/dev/null 2>&1 && break
            sleep 0.1
        done
        pg_sql postgres 'select 1' >/dev/null || die "still cannot log in as postgres on 127.0.0.1:$PG_PORT"
    fi
    if [[ -z $(pg_sql postgres "select 1 from pg_database where datname = '$PG_DATABASE'") ]]; then
        step "[2/4] postgresql: creating database $PG_DATABASE"
        pg_sql postgres "create database $PG_DATABASE" >/dev/null
    fi
    step "[2/4] postgresql: $pg_url/$PG_DATABASE answers"
fi

# --- 3. Python virtualenv -------------------------------------------------------------------------
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$(find_python) || die "no Python >= 3.11 with venv found (set PYTHON=/path/to/python3.11)"
    step "[3/4] creating .venv with $python ($("$python" --version 2>&1))"
    rm -rf .venv
    "$python" -m venv .venv
fi
stamp=.venv/.runplane-install-stamp
wanted=$(
    {
        sha256sum pyproject.toml constraints.txt
        ls -d sdk/*/ services/*/ 2>/dev/null
        readlink -f .venv/bin/python
    } | sha256sum | cut -d' ' -f1
)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    step "[3/4] .venv: runplane installed (pyproject.toml and constraints.txt unchanged)"
else
    step "[3/4] .venv: pip install -c constraints.txt -e '.[server,dev]' (log in .venv/pip-install.log)"
    if ! .venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt \
        -e '.[server,dev]' >.venv/pip-install.log 2>&1; then
        tail -n 40 .venv/pip-install.log >&2
        die "pip install failed (full log: .venv/pip-install.log)"
    fi
    echo "$wanted" >"$stamp"
fi

# --- 4. buf ---------------------------------------------------------------------------------------
buf=node_modules/.bin/buf
if [[ -x $buf && $("$buf" --version 2>/dev/null) == "$BUF_VERSION" ]]; then
    step "[4/4] buf $BUF_VERSION: present"
elif command -v npm >/dev/null; then
    step "[4/4] buf: npm install @bufbuild/buf@$BUF_VERSION"
    npm install --no-save --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >/dev/null
    [[ $("$buf" --version) == "$BUF_VERSION" ]] || die "buf $BUF_VERSION did not install"
else
    warn "[4/4] npm not found: buf not installed, so \`make lint\` cannot check protos"
fi

# --- Node.js package (clients/node): its dependencies from the committed lock file, then tsc --------
if command -v node >/dev/null && command -v npm >/dev/null; then
    node_major=$(node -p 'process.versions.node.split(".")[0]')
    if ((node_major < 20)); then
        warn "node $(node --version) is older than 20: clients/node not installed"
    else
        if [[ -d clients/node/node_modules/@connectrpc/connect-node && clients/node/node_modules/.package-lock.json -nt clients/node/package-lock.json ]]; then
            step "clients/node: dependencies present"
        else
            step "clients/node: npm ci ($(node --version))"
            (cd clients/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || die "npm ci in clients/node failed"
        fi
        step "clients/node: npm run build (tsc to clients/node/dist)"
        (cd clients/node && npm run --silent build) || die "npm run build in clients/node failed"
    fi
else
    warn "node/npm not found: the Node.js package (clients/node) is not installed"
fi
step "done"
