#!/usr/bin/env bash
# Ship what works: build the wheel, check it holds every package of the source tree, install it
# (not editable) with the daemon extra into a fresh venv, and run that venv's weightcached,
# cachectl and client together: prefetch a tiny model, open it over gRPC + fd.sock, compare
# every byte with the source. This is what a DaemonSet image does (pip install '.[daemon]'); an
# editable install hides packages missing from the wheel, as weightcache.contract once was.
#
#   tools/wheel_smoke.sh            (network for the dependencies, like `pip install`)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d /tmp/wheel-smoke.XXXXXX)
daemon_pid=""
cleanup() {
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill "$daemon_pid"
        wait "$daemon_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== wheel"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/weightcache-*.whl)
echo "$(basename "$wheel")"

# Every directory with an __init__.py under client/ and daemon/ is a package the wheel must hold.
python3 - "$wheel" <<'EOF'
import sys, zipfile
from pathlib import Path

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
want = sorted(
    str(init.parent.relative_to(top))
    for top in (Path("client"), Path("daemon"))
    for init in top.rglob("__init__.py")
    if init.parent.name != "tests"
)
missing = [p for p in want if f"{p}/__init__.py" not in names]
if missing:
    sys.exit(f"wheel lacks package(s): {', '.join(p.replace('/', '.') for p in missing)}")
print(f"{len(want)} packages in the wheel, none missing")
EOF

echo "== fresh venv, non-editable install"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$wheel[daemon]"
cd "$work"  # nothing of the checkout on sys.path from here on
py=$work/venv/bin/python
"$py" - <<EOF
import weightcache, weightcache_daemon, weightcache.contract, weightcache_daemon.edges.handlers
for m in (weightcache, weightcache_daemon, weightcache.contract):
    assert m.__file__.startswith("$work/venv/"), f"{m.__name__} imported from {m.__file__}, not the installed wheel"
print("imports from", weightcache.__file__.rsplit("/weightcache/", 1)[0])
EOF

echo "== daemon + client from the wheel"
python3 "$repo/tools/make_model.py" "$work/model" --tiny >/dev/null
sock=$work/sock admin=$work/admin/admin.sock
"$work/venv/bin/weightcached" --cache-dir "$work/store" --socket-dir "$sock" --admin-socket "$admin" \
    --log-format json >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 600); do
    "$work/venv/bin/cachectl" health --socket-dir "$sock" >/dev/null 2>&1 && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/daemon.log"; echo "weightcached exited"; exit 1; }
    sleep 0.1
done
"$work/venv/bin/cachectl" health --socket-dir "$sock" || { cat "$work/daemon.log"; exit 1; }
"$work/venv/bin/cachectl" --admin-socket "$admin" prefetch "file://$work/model/" --name tiny >/dev/null
"$py" - "$sock" "$work/model" <<'EOF'
import hashlib, os, sys
from pathlib import Path
import weightcache
from weightcache._fd import FdConnection

sock, model = sys.argv[1], Path(sys.argv[2])
with weightcache.connect(sock) as c:
    manifest = c.ensure("tiny")
with FdConnection(Path(sock) / "fd.sock") as conn:
    granted = conn.acquire(manifest.snapshot_id)
    for g in granted:
        data = os.pread(g.fd, os.fstat(g.fd).st_size + 1, 0)
        assert data == (model / g.path).read_bytes(), f"{g.path}: bytes differ from the source"
        assert hashlib.sha256(data).hexdigest() == g.sha256, g.path
        os.close(g.fd)
print(f"client: {len(granted)} files of 'tiny' read through fd.sock, identical to the source")
EOF
kill "$daemon_pid"
wait "$daemon_pid"
daemon_pid=""
echo "wheel smoke: OK"
