"""`run` over several architectures: the names from --arch / --arch-file, and the cross-architecture report.

Mistakes raise ValueError; the command line turns them into its one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path


def arch_list(args) -> list[str]:
    """`--arch a,b,c` and/or `--arch-file FILE` (one name a line), in order, without repeats."""
    names = [a.strip() for a in (args.arch or "").split(",") if a.strip()]
    if args.arch_file:
        path = Path(args.arch_file)
        if not path.is_file():
            raise ValueError(f"--arch-file {args.arch_file} is not a file")
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    if not names:
        raise ValueError("give the architecture(s) with --arch NAME[,NAME...] or --arch-file FILE")
    return list(dict.fromkeys(names))


def study_report(datas: list, args, root: Path, stored) -> int:
    """Several architectures: each run's stored report, then one architecture x method table."""
    import pandas as pd

    from oodcore import detectors as M
    from oodcore.evaluation.crossarch import format_study, study_rows
    from oodcore.evaluation.report import scores_frame

    reports = [stored(root, data, args.bootstrap) for data in datas]
    print(format_study(reports))
    for data, report in zip(datas, reports):
        missing = [m.name for m in M.REGISTRY.values() if not m.available(data)]
        missing += [u["method"] for u in report.get("unavailable", [])]
        if missing:
            print(f"not scored on {data.arch} (the cache lacks what they need): {', '.join(missing)}")
    if args.json_file:
        Path(args.json_file).parent.mkdir(parents=True, exist_ok=True)
        study = {
            "benchmark": reports[0]["benchmark"],
            "protocol": reports[0]["protocol"],
            "archs": [r["arch"] for r in reports],
            "table": study_rows(reports),
            "reports": reports,
        }
        Path(args.json_file).write_text(json.dumps(study, indent=2) + "\n")
        print(f"wrote {args.json_file}")
    if args.scores_csv:
        Path(args.scores_csv).parent.mkdir(parents=True, exist_ok=True)
        frames = []
        for data in datas:
            names = [r["method"] for r in next(r for r in reports if r["arch"] == data.arch)["results"]]
            frame = scores_frame(data, list(dict.fromkeys(names)))
            frame.insert(0, "arch", data.arch)
            frames.append(frame)
        pd.concat(frames, ignore_index=True).to_csv(args.scores_csv, index=False)
        print(f"wrote {args.scores_csv}")
    return 0
