"""Score per module from ``mutmut results --all true``: killed / (mutants that ran), the
survivors listed. Only the mutants that ``scripts/mutation_targets.txt`` selects count (a
systematic sample: every mutant whose number ends in 0 or 5, in the listed functions), so a
run that also has older results reports the same set.
Usage: python scripts/mutation_report.py mutants/results.txt out.json"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
NOT_RUN = {"not checked", "skipped", "no tests"}


def main(results: str, out: str) -> None:
    targets = [line.strip() for line in
               (Path(__file__).parent / "mutation_targets.txt").read_text().splitlines()
               if line.strip()]
    by_module: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for line in Path(results).read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if not match:
            continue
        name, status = match.groups()
        if not any(fnmatch.fnmatch(name, t) for t in targets) or status == "not checked":
            continue
        module = re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]
        by_module[module][status.strip()].append(name)
    rows = []
    for module, statuses in sorted(by_module.items()):
        killed = sum(len(v) for k, v in statuses.items() if k in KILLED)
        survived = statuses.get("survived", [])
        untested = statuses.get("no tests", [])
        ran = killed + len(survived) + len(untested)
        rows.append({"module": module, "mutants": ran, "killed": killed,
                     "survived": len(survived), "no_tests": len(untested),
                     "score": round(killed / ran, 3) if ran else None,
                     "survivors": sorted(survived + untested),
                     "other": {k: len(v) for k, v in statuses.items()
                               if k not in KILLED and k not in ("survived", "no tests")}})
    total = {k: sum(r[k] for r in rows) for k in ("mutants", "killed", "survived", "no_tests")}
    total["score"] = round(total["killed"] / total["mutants"], 3) if total["mutants"] else None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"modules": rows, "total": total}, indent=2) + "\n")
    print("| module | mutants | killed | survived | no test | score |\n|---|---|---|---|---|---|")
    for r in rows + [{"module": "all", **total}]:
        print(f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | "
              f"{r['no_tests']} | {r['score']} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
