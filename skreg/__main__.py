"""The main job: ``python -m skreg`` fits every family in a Pipeline + GridSearchCV.

Each family contributes a section in ``skreg/<family>/_demo.py`` (a function
``run_demo(device, quick)``); families without one are reported as not available.
"""

import argparse
import importlib
import importlib.util
import sys
import time

import torch
from threadpoolctl import threadpool_limits

from skreg import FAMILIES, __version__
from skreg._device import device_name, resolve_device
from skreg.utils._demo import format_table


def available_families():
    """Families that ship a demo section."""
    return [f for f in FAMILIES if importlib.util.find_spec(f"skreg.{f}._demo")]


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m skreg",
        description=(
            "Fit each skreg estimator family inside a scikit-learn Pipeline with "
            "GridSearchCV on bundled data, and print a table of the best parameters, "
            "the cross-validated score, the fit time and the device."
        ),
    )
    parser.add_argument(
        "--device", default="auto",
        help="where torch computes: 'auto' (CUDA when available, else CPU), 'cpu', "
             "'cuda' or 'cuda:N' (default: auto)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="small data and small grids: the whole run takes well under a minute",
    )
    parser.add_argument(
        "--family", action="append", choices=FAMILIES, metavar="NAME",
        help=f"run only this family (repeatable); one of: {', '.join(FAMILIES)}",
    )
    parser.add_argument(
        "--threads", type=int, default=1, metavar="N",
        help="CPU threads for torch and BLAS (default: 1; the demo problems are "
             "small, where extra threads cost more in synchronization than they "
             "save); 0 keeps the libraries' own defaults",
    )
    parser.add_argument(
        "--list", action="store_true",
        help="list the families and whether each is available, then exit",
    )
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    available = available_families()
    if args.list:
        for family in FAMILIES:
            state = "available" if family in available else "not available"
            print(f"{family}: {state}")
        return 0
    try:
        device = resolve_device(args.device)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.threads < 0:
        print(f"error: --threads must be 0 or more, got {args.threads}.",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    print(f"skreg {__version__} on {device_name(device)}")
    requested = args.family or list(FAMILIES)
    rows = []
    for family in requested:
        if family not in available:
            print(f"[{family}] not available in this version")
            continue
        print(f"[{family}] running ...", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"skreg.{family}._demo")
        family_rows = module.run_demo(device=str(device), quick=args.quick)
        rows.extend(family_rows)
        print(f"[{family}] done: {len(family_rows)} row(s) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    if rows:
        print()
        print(format_table(rows))
    else:
        print("No family with a demo section was run; available: "
              f"{', '.join(available) or 'none yet'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
