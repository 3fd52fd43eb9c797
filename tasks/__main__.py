"""`python -m tasks list [--split train|valid|heldout|all]`: a table of the suite."""
from __future__ import annotations

import argparse
import sys

from .registry import SUITES, get_task, list_tasks


def print_table(split: str) -> None:
    header = ("name", "family", "split", "params", "dataset", "batch", "data")
    rows = []
    for name in list_tasks(split):
        task = get_task(name)
        rows.append((task.name, task.family, task.split, f"{task.num_params():,}", task.dataset,
                     str(task.batch_size), "ok" if task.available() else "missing"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right_aligned = {3, 5}
    for row in [header, tuple("-" * w for w in widths), *rows]:
        cells = [cell.rjust(w) if i in right_aligned else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    list_cmd = commands.add_parser("list", help="print every task with family, split, params, dataset")
    list_cmd.add_argument("--split", choices=SUITES, default="all")
    args = parser.parse_args(argv)
    if args.command == "list":
        print_table(args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
