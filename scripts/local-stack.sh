#!/usr/bin/env bash
# The compose topology without containers, on 127.0.0.1 (for a workstation or CI without Docker):
# PostgreSQL (if installed), the Prefect server, the MLflow server and one process worker on pool "local".
# Prints the environment to export; Ctrl-C stops everything.   Usage: scripts/local-stack.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
exec "$PY" - "${1:-$(mktemp -d /tmp/nlsr-stack-XXXX)}" <<'PY'
import sys, time
from pathlib import Path
from flows import servers as s
work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
services = []
try:
    db = None
    if s.pg_bin("initdb"):
        pg, db, _ = s.start_postgres(); services.append(pg)
    prefect, api = s.start_prefect_server(work, db and f"postgresql+asyncpg://{db}/prefect", ui=True)
    services.append(prefect)
    mlflow, url = s.start_mlflow_server(work, db and f"postgresql+psycopg2://{db}/mlflow"); services.append(mlflow)
    services.append(s.start_worker(work, api, "local", env={"MLFLOW_TRACKING_URI": url}))
    print(f"export PREFECT_API_URL={api}\nexport MLFLOW_TRACKING_URI={url}\n"
          f"then: nlsr deploy --pool local && nlsr grid configs/grids/table1.yaml --pool local\n"
          f"logs in {work}; Ctrl-C stops everything", flush=True)
    while all(x.proc.poll() is None for x in services):
        time.sleep(1)
except KeyboardInterrupt:
    pass
finally:
    for x in reversed(services):
        x.stop()
PY
