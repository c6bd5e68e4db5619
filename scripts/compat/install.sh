#!/usr/bin/env bash
# Installs the pinned client libraries of the compatibility sessions when the installed ones
# differ: redis-py (requirements.txt, with pip) and ioredis (package-lock.json, with npm ci
# into scripts/compat/node_modules). Prints the versions in use.
set -euo pipefail
cd "$(dirname "$0")"
want_py="$(sed -n 's/^redis==//p' requirements.txt)"
have_py="$(python3 -c 'import redis; print(redis.__version__)' 2>/dev/null || true)"
if [ "$have_py" != "$want_py" ]; then
  # A distribution's own interpreter may refuse pip (PEP 668); this interpreter is only
  # the sessions' test driver, so the pinned package goes in anyway.
  python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
      -r requirements.txt \
    || { echo "compat: pip could not install redis==$want_py" >&2; exit 1; }
fi
want_js="$(node -p "require('./package.json').dependencies.ioredis")"
have_js="$(node -p "require('./node_modules/ioredis/package.json').version" 2>/dev/null || true)"
if [ "$have_js" != "$want_js" ]; then
  npm ci --no-audit --no-fund --loglevel=error \
    || { echo "compat: npm ci could not install ioredis $want_js" >&2; exit 1; }
fi
echo "redis-py $(python3 -c 'import redis; print(redis.__version__)'), ioredis $(node -p "require('./node_modules/ioredis/package.json').version"), node $(node --version)"
