"""skreg's sparsity-constrained OT against POT's, on the same problems.

Gaussian clouds (source N(0, I), target N(1, I)) with uniform masses and a
squared Euclidean cost; gamma = 0.1 * median(C) ("near OT") or that times n
("smooth"). For each problem: skreg (semi-dual), POT's semi-dual and dual
(``ot.smooth.smooth_ot_semi_dual/_dual(..., reg_type="sparsity_constrained")``,
default settings), each timed; POT's own semi-dual objective evaluated at each
solver's potentials (higher is better); marginal L1 errors of the read-out and
of skreg's repaired plan; max nonzeros per column; primal objective; cost gap to
``ot.emd2``. POT runs on n <= 1000 by default (it takes 26-45 s at n = 1000 and
over 150 s at n = 3000); ``--pot-large`` adds n = 3000.

Run: ``python benchmarks/bench_transport.py [--device cuda --large] [--quick]``;
``--hard-binding`` runs only a grid of small problems where k binds hard (few
columns, uneven masses) and counts where skreg's dual reaches POT's;
``--routing`` runs only batched token routing (many small problems in one call
against POT looped over them); ``--rectangular`` runs only rectangular problems
with uniform masses where k binds (how many of skreg's plans have the
marginals); ``--scales`` runs only the same problems in other units (masses
times s, costs times t, gamma times t / s) and in float32.
"""

import argparse
import contextlib
import io
import time
import warnings

import numpy as np
import ot
import torch
from ot.smooth import SparsityConstrained, semi_dual_obj_grad

from skreg._device import resolve_device
from skreg.transport import sparsity_constrained_ot


def _problem(n, d, seed=0):
    rng = np.random.RandomState(seed)
    xs, xt = rng.randn(n, d), rng.randn(n, d) + 1.0
    return np.full(n, 1.0 / n), np.full(n, 1.0 / n), ot.dist(xs, xt)


def _pot_objective(alpha, a, b, C, k, gamma):
    with contextlib.redirect_stdout(io.StringIO()):
        value, _ = semi_dual_obj_grad(alpha, a, b, C, SparsityConstrained(k, gamma))
    return value


def _errors(plan, a, b):
    return np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum()


def _run_pot(kind, a, b, C, k, gamma):
    solver = (ot.smooth.smooth_ot_semi_dual if kind == "semi_dual"
              else ot.smooth.smooth_ot_dual)
    start = time.perf_counter()
    # POT's projection_sparse_simplex prints on every evaluation.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, log = solver(a, b, C, gamma, reg_type="sparsity_constrained",
                           max_nz=k, log=True)
    seconds = time.perf_counter() - start
    return plan, log, seconds


def _against_pot(a, b, C, k, gamma, device):
    """skreg and POT's semi-dual on one problem.

    Returns skreg's result, POT's plan, ``(skreg - POT) / |POT|`` of POT's
    own objective at both solvers' potentials, and both times.
    """
    plan, log, pot_s = _run_pot("semi_dual", a, b, C, k, gamma)
    pot = _pot_objective(log["alpha"], a, b, C, k, gamma)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sparsity_constrained_ot(torch.as_tensor(a, device=device),
                                      torch.as_tensor(b, device=device),
                                      torch.as_tensor(C, device=device), k, gamma)
    ours = time.perf_counter() - start
    value = _pot_objective(res.alpha.cpu().numpy(), a, b, C, k, gamma)
    return res, plan, (value - pot) / abs(pot), ours, pot_s


def _hard_binding(device):
    """Small problems where k binds hard: few columns, uneven masses.

    skreg's dual against POT's on each (POT's own objective at both solvers'
    potentials), grouped by (n, m, k, gamma); the weak spot the user guide
    describes. Uniform-mass clouds as in the main table do not show it. Also
    how many of skreg's plans have the marginals (L1 error <= 1e-9), with
    their median gap to the dual (relative to ``1 + |dual|``).
    """
    header = ["n", "m", "k", "gamma", "problems", "skreg dual >= POT's",
              "median (skreg - POT) / |POT|", "worst", "skreg plans with the marginals",
              "median gap", "skreg s (median)", "POT s (median)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in (16, 24):
        for m in (6, 8):
            for k in (3, 5):
                if k * m < n:
                    continue
                for factor in (10.0, 100.0):
                    rel, ours, theirs, gaps = [], [], [], []
                    for seed in range(6):
                        rng = np.random.RandomState(seed)
                        xs, xt = rng.randn(n, 2), rng.randn(m, 2) + 1.0
                        a, b = rng.rand(n) + 0.5, rng.rand(m) + 0.5
                        a, b, C = a / a.sum(), b / b.sum(), ot.dist(xs, xt)
                        gamma = factor * float(np.median(C))
                        res, _, gain, our_s, pot_s = _against_pot(a, b, C, k, gamma,
                                                                  device)
                        if float(res.marginal_error) <= 1e-9:
                            dual = float(res.dual_objective)
                            gaps.append(float(res.duality_gap) / (1.0 + abs(dual)))
                        rel.append(gain)
                        ours.append(our_s)
                        theirs.append(pot_s)
                    rel = np.array(rel)
                    cells = [str(n), str(m), str(k), f"{factor:g} med",
                             str(rel.size), str(int((rel >= -1e-12).sum())),
                             f"{np.median(rel):+.1e}", f"{rel.min():+.1e}",
                             str(len(gaps)),
                             f"{np.median(gaps):.1e}" if gaps else "-",
                             f"{np.median(ours):.3f}", f"{np.median(theirs):.3f}"]
                    print("| " + " | ".join(cells) + " |", flush=True)


def _rectangular(device):
    """Rectangular problems with uniform masses, where k binds.

    Source and target clouds of different sizes (5-D, target shifted by 0.5),
    uniform masses, 3 seeds per row. Reported: how many of skreg's plans
    have the marginals (L1 error <= 1e-9) and their median gap to the dual
    (relative to ``1 + |dual|``), how many of skreg's duals reach POT's
    (POT's own objective at both solvers' potentials), the median marginal
    error of POT's read-out, and times. Where the exact plan puts more than
    k rows in a column and ``n + m - 1 <= k m``, the repair's exact-OT
    support comes from the degree pivots (``skreg.transport._degree``).
    """
    header = ["n", "m", "k", "gamma", "problems", "skreg plans with the marginals",
              "median gap", "skreg dual >= POT's", "POT err (median)",
              "skreg s (median)", "POT s (median)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n, m in ((60, 90), (90, 60), (200, 300), (300, 200), (300, 400)):
        for k in (2, 3):
            for factor in (1.0, 0.1 * max(n, m)):
                fixed, gaps, rel, errs, ours, theirs = 0, [], [], [], [], []
                for seed in range(3):
                    rng = np.random.RandomState(seed)
                    C = ot.dist(rng.randn(n, 5), rng.randn(m, 5) + 0.5)
                    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
                    gamma = factor * float(np.median(C))
                    res, plan, gain, our_s, pot_s = _against_pot(a, b, C, k, gamma,
                                                                 device)
                    rel.append(gain)
                    ours.append(our_s)
                    theirs.append(pot_s)
                    errs.append(_errors(plan, a, b))
                    if float(res.marginal_error) <= 1e-9:
                        fixed += 1
                        dual = float(res.dual_objective)
                        gaps.append(float(res.duality_gap) / (1.0 + abs(dual)))
                rel = np.array(rel)
                gap = f"{np.median(gaps):.1e}" if gaps else "-"
                cells = [str(n), str(m), str(k), f"{factor:g} med", str(rel.size),
                         str(fixed), gap, str(int((rel >= -1e-12).sum())),
                         f"{np.median(errs):.1e}", f"{np.median(ours):.2f}",
                         f"{np.median(theirs):.2f}"]
                print("| " + " | ".join(cells) + " |", flush=True)


def _routing(device):
    """Token routing: groups of tokens sent to experts, at most k per token.

    Each group is one problem: rows are the ``n`` experts (equal capacity
    shares ``a``), columns the ``m`` tokens (``b`` uniform), the cost the
    negated token-expert affinity (shifted to be nonnegative), so a plan with
    at most k nonzeros per column routes every token to at most k experts.
    skreg solves the ``B`` groups in one batched call; POT runs once per group.
    Reported: times (skreg's also looped over the groups, with the largest
    difference between its batched and looped plans), how many of skreg's
    duals reach POT's (POT's own objective at both solvers' potentials), and
    the marginal errors of the returned plans (skreg's repaired, POT's
    read-out).
    """
    header = ["groups", "experts n", "tokens m", "k", "gamma", "skreg s (batch)",
              "POT s (loop)", "ratio", "skreg s (loop)", "batch - loop (max)",
              "skreg dual >= POT's", "median (skreg - POT) / |POT|",
              "skreg plans with the marginals", "skreg err (max)",
              "POT err (median)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for groups, n, m, k in ((32, 8, 64, 2), (32, 16, 128, 2), (8, 16, 256, 4),
                            (128, 8, 64, 2), (512, 8, 64, 2), (256, 16, 128, 2)):
        rng = np.random.RandomState(0)
        tokens = rng.randn(groups, m, 16)
        experts = rng.randn(groups, n, 16)
        C = -np.einsum("gnd,gmd->gnm", experts, tokens) / 4.0
        C -= C.min(axis=(1, 2), keepdims=True)
        a, b = np.full((groups, n), 1.0 / n), np.full((groups, m), 1.0 / m)
        for factor in (0.1, 1.0):
            gamma = factor * float(np.median(C))
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = sparsity_constrained_ot(
                    *(torch.as_tensor(x, device=device) for x in (a, b, C)), k, gamma)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ours_s = time.perf_counter() - start
            alpha = res.alpha.cpu().numpy()
            errors = res.marginal_error.cpu().numpy()
            plans = res.plan.cpu().numpy()
            rel, pot_errors, pot_s, loop_s, apart = [], [], 0.0, 0.0, 0.0
            for g in range(groups):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    alone = sparsity_constrained_ot(
                        *(torch.as_tensor(x[g], device=device) for x in (a, b, C)),
                        k, gamma)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                loop_s += time.perf_counter() - start
                apart = max(apart, float(np.abs(alone.plan.cpu().numpy()
                                                 - plans[g]).max()))
                plan, log, seconds = _run_pot("semi_dual", a[g], b[g], C[g], k, gamma)
                pot_s += seconds
                pot = _pot_objective(log["alpha"], a[g], b[g], C[g], k, gamma)
                ours = _pot_objective(alpha[g], a[g], b[g], C[g], k, gamma)
                rel.append((ours - pot) / abs(pot))
                pot_errors.append(_errors(plan, a[g], b[g]))
            rel = np.array(rel)
            cells = [str(groups), str(n), str(m), str(k), f"{factor:g} med",
                     f"{ours_s:.2f}", f"{pot_s:.2f}", f"{pot_s / ours_s:.1f}x",
                     f"{loop_s:.2f}", f"{apart:.1e}",
                     f"{int((rel >= -1e-12).sum())} of {groups}",
                     f"{np.median(rel):+.1e}",
                     f"{int((errors <= 1e-9).sum())} of {groups}",
                     f"{errors.max():.1e}", f"{np.median(pot_errors):.1e}"]
            print("| " + " | ".join(cells) + " |", flush=True)


def _scales(device):
    """The same problem in other units, and in float32.

    ``(s a, s b, t C, gamma t / s)`` is ``s t`` times ``(a, b, C, gamma)``:
    each solver's dual objective (POT's own semi-dual objective at its
    potentials, divided by ``s t``) is compared with skreg's at unit scale,
    and marginal errors are divided by ``s``. The float32 rows pass float32
    masses and costs (n = 1000: there plan entries ``(alpha - C) / (gamma
    b_j)`` need more than float32's resolution); POT is not run on them.
    """
    header = ["n", "k", "binds", "s (masses)", "t (costs)", "dtype",
              "skreg dual / unit - 1", "skreg err / s", "skreg s",
              "POT dual / unit - 1", "POT err / s", "POT s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = [(200, s, t, np.float64) for s, t in
            ((1.0, 1.0), (1e-6, 1.0), (1e-3, 1.0), (1e6, 1.0), (1.0, 1e-6), (1.0, 1e6))]
    rows += [(1000, 1.0, 1.0, np.float32)]
    for n, scale, unit, dtype in rows:
        a, b, C = _problem(n, 2)
        for k in (2, 10):
            gamma = 0.1 * float(np.median(C))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = sparsity_constrained_ot(a, b, C, k, gamma)
                start = time.perf_counter()
                res = sparsity_constrained_ot(
                    *(torch.as_tensor((x * f).astype(dtype), device=device)
                      for x, f in ((a, scale), (b, scale), (C, unit))),
                    k, gamma * unit / scale)
                ours_s = time.perf_counter() - start
            dual = float(res.dual_objective) / (scale * unit)
            cells = [str(n), str(k), str(bool(ref.binding)), f"{scale:g}", f"{unit:g}",
                     np.dtype(dtype).name,
                     f"{(dual - ref.dual_objective) / abs(ref.dual_objective):+.1e}",
                     f"{float(res.marginal_error) / scale:.1e}", f"{ours_s:.2f}"]
            if dtype == np.float64:
                sa, sb, sC = a * scale, b * scale, C * unit
                plan, log, pot_s = _run_pot("semi_dual", sa, sb, sC, k,
                                            gamma * unit / scale)
                pot = _pot_objective(log["alpha"], sa, sb, sC, k,
                                     gamma * unit / scale) / (scale * unit)
                rel = (pot - ref.dual_objective) / abs(ref.dual_objective)
                cells += [f"{rel:+.1e}", f"{_errors(plan, sa, sb) / scale:.1e}",
                          f"{pot_s:.2f}"]
            else:
                cells += ["-", "-", "-"]
            print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true",
                        help="add n = 10000 and 30000 (skreg only; for a GPU)")
    parser.add_argument("--pot-large", action="store_true",
                        help="also run POT at n = 3000 (minutes per row)")
    parser.add_argument("--pot-max-n", type=int, default=None,
                        help="largest n on which POT runs (default 1000, 3000 "
                             "with --pot-large; 0 runs skreg alone)")
    parser.add_argument("--quick", action="store_true",
                        help="n = 200 and 1000, d = 2 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="override the list of n")
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help="override the list of d")
    parser.add_argument("--pot-dual-max-n", type=int, default=1000,
                        help="largest n on which POT's dual also runs")
    parser.add_argument("--hard-binding", action="store_true",
                        help="only the grid of small hard-binding problems "
                             "(few columns, uneven masses)")
    parser.add_argument("--rectangular", action="store_true",
                        help="only rectangular problems with uniform masses "
                             "where k binds")
    parser.add_argument("--routing", action="store_true",
                        help="only batched token routing (groups of tokens "
                             "to experts) against POT looped over the groups")
    parser.add_argument("--scales", action="store_true",
                        help="only the same problems in other units (masses, "
                             "costs) and in float32")
    parser.add_argument("--repair", choices=["true", "false", "full"], default="true",
                        help="the repair argument of the main table's solves "
                             "(default true; full tries the exact-OT support "
                             "at any size)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 10],
                        help="override the list of k (default 2 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fair to POT, and "
                             "faster on a loaded machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    sizes = [200, 1000] if args.quick else [200, 1000, 3000]
    if args.large:
        sizes += [10000, 30000]
    dims = [2] if args.quick else [2, 10]
    sizes = args.sizes or sizes
    dims = args.dims or dims
    pot_max = 3000 if args.pot_large else 1000
    if args.pot_max_n is not None:
        pot_max = args.pot_max_n

    repair = {"true": True, "false": False, "full": "full"}[args.repair]
    print(f"device={device}, torch threads={args.threads}, repair={repair!r}")
    # Warm-up: the first call on a device pays for its start-up (CUDA context,
    # kernels loaded on first use), which no row should carry.
    a, b, C = _problem(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsity_constrained_ot(*(torch.as_tensor(x, device=device) for x in (a, b, C)),
                                2, float(np.median(C)))
    if args.hard_binding:
        _hard_binding(device)
        return
    if args.routing:
        _routing(device)
        return
    if args.rectangular:
        _rectangular(device)
        return
    if args.scales:
        _scales(device)
        return
    header = ["n", "d", "k", "gamma", "skreg s", "POT semi s", "POT dual s",
              "ratio", "skreg iters", "POT obj @skreg - POT obj",
              "POT obj @POT dual", "err read-out skreg", "err POT semi",
              "err POT dual", "err repaired", "repaired", "binding",
              "max nnz/col", "primal", "gap", "cost / emd2 - 1"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in sizes:
        for d in dims:
            a, b, C = _problem(n, d)
            median = float(np.median(C))
            emd = ot.emd2(a, b, C, numItermax=10**7) if n <= 3000 else float("nan")
            C_dev = torch.as_tensor(C, device=device)
            a_dev = torch.as_tensor(a, device=device)
            b_dev = torch.as_tensor(b, device=device)
            for k in args.ks:
                for label, gamma in (("0.1 med", 0.1 * median),
                                     ("0.1 med n", 0.1 * median * n)):
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = sparsity_constrained_ot(a_dev, b_dev, C_dev, k, gamma,
                                                      repair=repair)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    ours_s = time.perf_counter() - start
                    plan = res.plan.cpu().numpy()
                    row = {"skreg s": f"{ours_s:.2f}"}
                    if n <= pot_max:
                        ours_obj = _pot_objective(res.alpha.cpu().numpy(), a, b, C,
                                                  k, gamma)
                        pot_plan, pot_log, pot_s = _run_pot("semi_dual", a, b, C, k,
                                                            gamma)
                        pot_obj = _pot_objective(pot_log["alpha"], a, b, C, k, gamma)
                        row.update({
                            "POT semi s": f"{pot_s:.2f}",
                            "ratio": f"{pot_s / ours_s:.1f}x",
                            "POT obj @skreg - POT obj": f"{ours_obj - pot_obj:+.2e}",
                            "err POT semi": f"{_errors(pot_plan, a, b):.1e}",
                        })
                        if n <= args.pot_dual_max_n:
                            dual_plan, dual_log, dual_s = _run_pot("dual", a, b, C,
                                                                   k, gamma)
                            dual_obj = _pot_objective(dual_log["alpha"], a, b, C,
                                                      k, gamma)
                            row.update({
                                "POT dual s": f"{dual_s:.2f}",
                                "POT obj @POT dual": f"{dual_obj - pot_obj:+.2e}",
                                "err POT dual": f"{_errors(dual_plan, a, b):.1e}",
                            })
                    else:
                        # skreg's own dual value: the same function as POT's
                        # objective (tested), without POT's O(n^2 log n) pass.
                        row.update({"POT obj @skreg - POT obj":
                                    f"{float(res.dual_objective):.6f}"})
                    cells = [
                        str(n), str(d), str(k), label, row["skreg s"],
                        row.get("POT semi s", "-"), row.get("POT dual s", "-"),
                        row.get("ratio", "-"), f"{int(res.n_iter)}",
                        row["POT obj @skreg - POT obj"],
                        row.get("POT obj @POT dual", "-"),
                        f"{float(res.readout_marginal_error):.1e}",
                        row.get("err POT semi", "-"), row.get("err POT dual", "-"),
                        f"{float(res.marginal_error):.1e}",
                        str(bool(res.repaired)), str(bool(res.binding)),
                        str(int(np.count_nonzero(plan, axis=0).max())),
                        f"{float(res.primal_objective):.6f}",
                        f"{float(res.duality_gap):.1e}",
                        f"{float(res.cost) / emd - 1:+.3f}" if emd == emd else "-",
                    ]
                    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
