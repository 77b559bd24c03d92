#!/usr/bin/env bash
# Validate the deployment files that can be checked without a cluster or a Docker engine:
#
#   - deploy/prometheus/alerts.yml        promtool check rules + promtool test rules
#   - deploy/grafana/*.json               JSON parses; every PromQL query parses (promtool)
#   - deploy/kubernetes/*.yaml            YAML parses; basic shape; kustomization complete;
#                                         the ConfigMap's serversync.toml parses
#   - deploy/systemd/serversync.service   systemd-analyze verify
#   - Dockerfile                          every COPY source exists
#   - docs/OPERATIONS.md                  every alert's runbook anchor exists
#
# Usage: bash deploy/validate.sh        (from anywhere; runs in ~5-30s)
# Installs what is missing (promtool, systemd-analyze, python3-yaml) through apt when
# run as root, e.g. in CI on a bare Debian 12 machine. promtool is taken from Debian's
# `prometheus` package by extracting it (no Prometheus server is installed or started).
#
# Environment:
#   PROMTOOL=/path/to/promtool   use this promtool
#   SERVERSYNC_UNIT=file         verify this unit file instead (to test this script)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=
apt_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -qq >/dev/null && APT_UPDATED=1 || return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- tools --------------------------------------------------------------------------

ensure_python() {
    if ! command -v python3 >/dev/null; then
        apt_install python3 python3-yaml || die "python3 is missing and could not be installed"
    fi
    if ! python3 -c 'import yaml' 2>/dev/null; then
        # Debian's package for Debian's python3; pip for any other python3 on PATH.
        apt_install python3-yaml || true
        python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml || true
        python3 -c 'import yaml' 2>/dev/null || die "PyYAML is missing for $(command -v python3) and could not be installed"
    fi
}

# promtool: $PROMTOOL, then PATH, then a cached copy, then extract it from Debian's
# prometheus .deb (apt-get download + dpkg-deb -x: nothing is installed, no service is
# started), and as a last resort install the package.
ensure_promtool() {
    if [ -n "${PROMTOOL:-}" ]; then return; fi
    if command -v promtool >/dev/null; then PROMTOOL=$(command -v promtool); return; fi
    local cache="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/serversync-validate"
    if [ -x "$cache/promtool" ]; then PROMTOOL="$cache/promtool"; return; fi
    echo "promtool not found: fetching Debian's prometheus package"
    local dl="$WORK/deb"
    mkdir -p "$dl" "$cache"
    download() { (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root prometheus >/dev/null 2>&1); }
    if download || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null && APT_UPDATED=1 && download; }; then
        dpkg-deb -x "$dl"/prometheus_*.deb "$dl/x"
        install -m 0755 "$dl/x/usr/bin/promtool" "$cache/promtool"
        PROMTOOL="$cache/promtool"
    elif apt_install prometheus; then
        PROMTOOL=$(command -v promtool)
    else
        die "promtool is missing and could not be fetched (run as root, or set PROMTOOL=)"
    fi
}

ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null && return
    apt_install systemd || die "systemd-analyze is missing and could not be installed"
}

ensure_python
ensure_promtool
ensure_systemd_analyze
echo "promtool: $PROMTOOL ($("$PROMTOOL" --version 2>&1 | head -n1))"
echo "systemd:  $(systemd-analyze --version | head -n1)"

# ---- Prometheus rules ---------------------------------------------------------------

step "promtool check rules deploy/prometheus/alerts.yml"
"$PROMTOOL" check rules deploy/prometheus/alerts.yml

step "promtool test rules deploy/prometheus/alerts_test.yml"
"$PROMTOOL" test rules deploy/prometheus/alerts_test.yml

step "runbook links in alerts.yml resolve to headings in docs/OPERATIONS.md"
python3 - <<'EOF'
import re, sys, yaml
rules = [r for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"] for r in g["rules"]]
def slug(h):  # GitHub's heading anchors
    h = re.sub(r"[^\w\- ]", "", h.strip().lower())
    return h.replace(" ", "-")
doc = open("docs/OPERATIONS.md", encoding="utf-8").read()
anchors = {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", doc, re.M)}
anchors |= set(re.findall(r'<a (?:name|id)="([^"]+)"', doc))
bad = 0
for r in rules:
    name, a = r.get("alert"), r.get("annotations", {})
    for key in ("summary", "description", "runbook"):
        if not a.get(key):
            print(f"{name}: missing annotation {key}"); bad += 1
    if "severity" not in r.get("labels", {}) or "for" not in r:
        print(f"{name}: needs a severity label and a for: clause"); bad += 1
    link = a.get("runbook", "")
    if not link.startswith("docs/OPERATIONS.md#") or link.split("#", 1)[1] not in anchors:
        print(f"{name}: runbook {link!r} has no matching heading in docs/OPERATIONS.md"); bad += 1
    elif f"`{name}`" not in doc and name not in doc:
        print(f"{name}: not described in docs/OPERATIONS.md"); bad += 1
print(f"{len(rules)} alerts checked")
sys.exit(1 if bad else 0)
EOF

# ---- Grafana ------------------------------------------------------------------------

step "Grafana dashboards: JSON and PromQL"
python3 - "$WORK/dashboard-rules.yml" <<'EOF'
import glob, json, sys, yaml
out, rules = sys.argv[1], []
for path in sorted(glob.glob("deploy/grafana/*.json")):
    d = json.load(open(path))
    assert d.get("title") and d.get("uid"), f"{path}: needs title and uid"
    names = [v["name"] for v in d.get("templating", {}).get("list", [])]
    assert "datasource" in names, f"{path}: needs a datasource variable"
    panels = d["panels"] + [p for r in d["panels"] for p in r.get("panels", [])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"{path}: duplicate panel ids"
    n = 0
    for p in panels:
        for t in p.get("targets", []):
            # Replace Grafana variables with values PromQL accepts, then let promtool
            # parse each query as a recording rule.
            expr = (t["expr"].replace("$__rate_interval", "5m").replace("$__interval", "1m")
                    .replace("$__range", "1h").replace("$job", ".*").replace("$instance", ".*"))
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
            n += 1
    print(f"{path}: {len(panels)} panels, {n} queries")
yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, open(out, "w"))
EOF
"$PROMTOOL" check rules "$WORK/dashboard-rules.yml" >/dev/null \
    || { "$PROMTOOL" check rules "$WORK/dashboard-rules.yml"; die "a dashboard query does not parse"; }
echo "all dashboard queries parse"

# ---- Kubernetes ---------------------------------------------------------------------

step "Kubernetes manifests"
python3 - <<'EOF'
import glob, os, sys, yaml
try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

def flatten(table, prefix=""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"

# serversync rejects unknown keys at start-up: every key of the ConfigMap's TOML must
# be one that config/serversync.example.toml (which lists every key) knows, set or
# commented out.
EXAMPLE = "config/serversync.example.toml"
def check_toml(path, name, text):
    keys = set(flatten(tomllib.loads(text)))
    if os.path.exists(EXAMPLE):
        example_text = open(EXAMPLE).read()
        known = set(flatten(tomllib.loads(example_text)))
        section, commented = "", set()
        for line in example_text.splitlines():
            line = line.strip().lstrip("#").strip()
            if line.startswith("[") and line.endswith("]") and "=" not in line:
                section = line.strip("[]").strip() + "."
            elif "=" in line and line.split("=", 1)[0].strip().isidentifier():
                commented.add(section + line.split("=", 1)[0].strip())
        unknown = sorted(k for k in keys if k not in known | commented
                         and not k.startswith(("retry.overrides.", "ordering.keys.")))
        assert not unknown, f"{path}: {name} has keys unknown to {EXAMPLE}: {unknown}"
    print(f"{path}: {name} is valid TOML with {len(keys)} known keys")

files = sorted(glob.glob("deploy/kubernetes/*.yaml"))
assert files, "no manifests"
listed = []
for path in files:
    docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    assert docs, f"{path}: empty"
    for d in docs:
        for key in ("apiVersion", "kind"):
            assert key in d, f"{path}: missing {key}"
        if d["kind"] == "Kustomization":
            listed = d.get("resources", [])
            continue
        assert d.get("metadata", {}).get("name"), f"{path}: missing metadata.name"
        if d["kind"] == "ConfigMap":
            for name, text in d.get("data", {}).items():
                if name.endswith(".toml") and tomllib:
                    check_toml(path, name, text)
    print(f"{path}: ok ({', '.join(d['kind'] for d in docs)})")
missing = [r for r in listed if not os.path.exists(os.path.join("deploy/kubernetes", r))]
assert not missing, f"kustomization.yaml lists missing files: {missing}"
unlisted = [os.path.basename(f) for f in files
            if os.path.basename(f) not in listed and os.path.basename(f) != "kustomization.yaml"]
assert not unlisted, f"not listed in kustomization.yaml: {unlisted}"
EOF

# ---- systemd ------------------------------------------------------------------------

UNIT=${SERVERSYNC_UNIT:-deploy/systemd/serversync.service}
step "systemd-analyze verify $UNIT"
BIN=/usr/local/bin/serversync
grep -q "^ExecStart=$BIN " "$UNIT" || die "$UNIT: ExecStart= does not start with $BIN"
# verify checks that ExecStart's binary exists and is executable; point it at a stand-in
# so the check does not depend on an installed serversync. Everything else is verified
# as written. The copy keeps the unit's name, so messages about it say serversync.service.
mkdir -p "$WORK/systemd" "$WORK/bin"
printf '#!/bin/sh\nexit 0\n' >"$WORK/bin/serversync"
chmod 0755 "$WORK/bin/serversync"
sed "s#^ExecStart=$BIN #ExecStart=$WORK/bin/serversync #" "$UNIT" >"$WORK/systemd/serversync.service"
set +e
systemd-analyze verify --man=no "$WORK/systemd/serversync.service" >"$WORK/verify.log" 2>&1
rc=$?
set -e
# systemd-analyze exits 0 on many real mistakes (unknown keys, unparsable values are
# only logged), and it may also complain about other units on the host or the lack of
# a running systemd. So: any message about our unit fails, whatever the exit code;
# messages about nothing of ours are shown but do not fail.
ours=$(grep -E "serversync\.service|$WORK" "$WORK/verify.log" || true)
others=$(grep -vE "serversync\.service|$WORK" "$WORK/verify.log" || true)
if [ -n "$others" ]; then
    printf 'note: systemd-analyze said about other things (not failing on these):\n%s\n' "$others"
fi
if [ -n "$ours" ]; then
    printf '%s\n' "$ours" | sed "s#$WORK/systemd/#$(dirname "$UNIT")/#g"
    die "systemd-analyze verify found problems in $UNIT"
fi
[ "$rc" = 0 ] || echo "note: systemd-analyze exited $rc without naming our unit"
echo "$UNIT: ok"

# ---- Dockerfile ---------------------------------------------------------------------

step "Dockerfile COPY sources exist"
bad=0
while read -r src; do
    if [ -e "$src" ]; then echo "  $src"; else echo "  MISSING: $src"; bad=1; fi
done < <(grep -E '^COPY ' Dockerfile | grep -v -- '--from=' \
            | awk '{for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i}')
[ "$bad" = 0 ] || die "Dockerfile copies files that do not exist"

printf '\nAll deployment files are valid.\n'
