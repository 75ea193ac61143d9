"""``python -m steppo_verl.inspect RUN_DIR --out report.html``: render a run's step records."""

from __future__ import annotations

import argparse
import sys

from steppo_verl.inspect.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steppo_verl.inspect",
        description="Render the step records under RUN_DIR/steppo_steps/ into one self-contained HTML file.",
    )
    parser.add_argument("run_dir", help="the run directory the trainer dumped step records into")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    parser.add_argument("--title", default=None, help="page title (default: derived from RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir, args.out, args.title)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
