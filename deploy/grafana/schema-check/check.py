"""Check the Grafana dashboard against Grafana's published schema: ``python check.py``.

The dashboard JSON becomes an object literal typed as ``@grafana/schema``'s ``Dashboard`` (its
string enums taken as their string values) and ``tsc --strict`` compiles it: a wrong type, a
missing required field or an unknown property is an error. The export metadata (``__inputs``,
``__requires``, ``__elements``) is not part of the dashboard model and is left out. Needs
``npm``; installs the pinned packages of ``package-lock.json`` into ``node_modules`` here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import msgspec

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parent / "clipia-proxy.json"
PRELUDE = """import type { Dashboard } from "@grafana/schema";

// The JSON form of a schema type: its string enums as their string values.
type Json<T> = T extends string
  ? `${T}`
  : T extends (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

export const dashboard: Json<Dashboard> = """


def main() -> int:
    """Write ``dashboard.ts``, install the pinned packages once, run ``tsc``; its exit code."""
    npm = shutil.which("npm")
    if npm is None:
        sys.stderr.write("check.py: npm is missing (apt-get install -y npm)\n")
        return 2
    model = msgspec.json.decode(DASHBOARD.read_bytes())
    for key in [key for key in model if key.startswith("__")]:
        del model[key]
    text = PRELUDE + msgspec.json.format(msgspec.json.encode(model), indent=1).decode() + ";\n"
    (HERE / "dashboard.ts").write_text(text, encoding="utf-8")
    if not (HERE / "node_modules" / "@grafana" / "schema").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True)  # noqa: S603
    tsc = HERE / "node_modules" / ".bin" / "tsc"
    done = subprocess.run([str(tsc), "-p", "tsconfig.json"], cwd=HERE, check=False)  # noqa: S603
    if done.returncode == 0:
        sys.stdout.write(f"{DASHBOARD.name}: matches @grafana/schema's Dashboard\n")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
