# Sourced by setup.sh and setup-sglang.sh: timed step lines and a pip install that fails the script.
# The caller sets VENV, LABEL and (optionally) NOISE, an extended regex of pip lines that are not problems.
T0=$SECONDS
NOISE=${NOISE:-'^WARNING: Location'}
say() { printf '[%s %d:%02d] %s\n' "$LABEL" $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60)) "$*"; }
# "... still installing" every 30 s; on TERM it also ends its sleep, which would otherwise hold the
# output pipe open (and the caller waiting) for up to 30 s after each install.
heartbeat() {
  local s
  trap 'kill $s 2>/dev/null; exit 0' TERM
  while :; do sleep 30 & s=$!; wait $s; say "... still installing"; done
}
pip_install() {
  local ticker
  heartbeat & ticker=$!
  set +e
  "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 | { grep -v -E "$NOISE" || true; }
  local rc=${PIPESTATUS[0]}
  set -e
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then say "FAILED (pip exit $rc): pip install $*" >&2; exit "$rc"; fi
}
# The checkout grace_qat is installed from in venv $1 when the modules $2 import there too, else nothing.
installed_checkout() {   # installed_checkout VENV "MODULES": the checkout an editable grace-qat in VENV
  # points at, if MODULES import there; empty otherwise. Asked from / and of the installed distribution,
  # not of `import grace_qat`: run inside a checkout, that import finds the checkout itself, installed
  # or not (a fresh clone's SGLang venv was taken for set up and its entry point never registered).
  local venv
  venv=$(cd "$1" 2>/dev/null && pwd) || return 0
  (cd / && "$venv/bin/python" -c "import $2
import importlib.metadata as m, json
u = json.loads(m.distribution('grace-qat').read_text('direct_url.json') or '{}')
print(u['url'][len('file://'):] if u.get('dir_info', {}).get('editable') and u.get('url', '').startswith('file://') else '')" \
    2>/dev/null) || true
}
