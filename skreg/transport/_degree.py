"""Transport plans with at most ``k`` positive entries per column, by pivots.

An exact (unregularized) optimal plan is a vertex of the transport polytope:
its positive entries form a forest of the bipartite row-column graph. Where
some column of it has more than ``k`` rows, :func:`degree_capped_plan` moves
it, by network-simplex pivots on a spanning tree that contains the forest,
to a plan with at most ``k`` rows per column:

1. *Degree pivots.* An entry ``(r, j)`` of the fullest column leaves the
   tree. Removing it splits the tree in two; the mass ``P_rj`` that crossed
   the cut now crosses it on an entering entry ``(i, j')``, from a row ``i``
   on ``r``'s side to a column ``j'`` on ``j``'s side with fewer than ``k``
   rows (or, failing that, at ``k`` rows with one of them emptied by the
   same pivot), the one of least reduced cost among those whose cycle has
   no other entry lighter than ``P_rj`` to take mass from and turns no
   column's zero entry positive beyond ``k``. Every such pivot lowers the
   excess over ``k`` by at least one and adds none, so the phase ends after
   at most that many pivots, with a plan, or without one where no entry
   qualifies.
2. *Cost pivots.* Ordinary network-simplex pivots (entering entry of
   negative reduced cost, leaving entry the cycle's lightest) taken only
   where no column ends above ``k``; the entering entries are each column's
   ``_CANDIDATE_ROWS`` rows of least reduced cost once the degree pivots
   are done.

Both keep the marginals exactly. Whether any plan with at most ``k`` rows per
column exists is a combinatorial question (for ``k = 1`` a partition
problem), and the pivots only find one reachable this way. A spanning tree
has ``n + m - 1`` entries, so with masses in general position (no subset
sums equal) a plan needs ``n + m - 1 <= k m``; uniform masses allow fewer
entries (a forest), which pivots whose cycle empties several entries at
once create (300 x 200, k = 2). Measured on 12 random
5-D problems (n, m in 20-120), on those whose exact plan has a column above
``k >= 2``: with uniform masses a plan on 7 of 8, and on the eighth (60 x 35, k = 2)
none exists (every column would need two whole rows); with random masses on
1 of 9, where a MILP (HiGHS, 30 s each) found plans on 4 more.
"""

from collections import deque

import numpy as np

# Entering entries offered to the cost pivots: each column's rows of least
# reduced cost once the degree pivots are done.
_CANDIDATE_ROWS = 8
# Entering entries tried per cost pivot, most negative reduced cost first.
_COST_TRIES = 64
# Entering entries tried per leaving entry where the entering column is at k.
_FULL_TRIES = 256
# Nodes each side's walk visits for entering entries, the nearest first.
_WALK_LIMIT = 400
# A degree pivot walks at most _WALK_LIMIT nodes on each side of its cut, and
# all n + m to recompute the potentials where neither walk covered its side;
# a cost pivot recomputes them every time (Python loops). The degree pivots
# run only where the excess over k times n + m is at most _PIVOT_WORK, the
# cost pivots stop after _COST_WORK / (n + m) of them. Measured, uniform
# masses, k = 2 (the solve itself takes far longer at these sizes): 700 x
# 1000, excess 144, 0.8 s; 1400 x 2000, 296, 2.3 s; 3000 x 2000, 999, 2.3 s;
# 2500 x 3500, 536, 3.7 s.
_PIVOT_WORK = 10**7
_COST_WORK = 3 * 10**5


class _Tree:
    """A spanning tree of the row-column graph with a flow on each edge.

    Nodes ``0 .. n-1`` are rows, ``n .. n+m-1`` columns; ``adj[x]`` maps each
    neighbour of ``x`` to the flow on their edge.
    """

    def __init__(self, n, m, rows, cols, values):
        self.n, self.m = n, m
        # Flows below this are zero (rounding of the pushes).
        self.eps = 1e-14 * float(values.sum())
        self.adj = [{} for _ in range(n + m)]
        for i, j, f in zip(rows.tolist(), cols.tolist(), values.tolist(), strict=True):
            self.set(i, n + j, f)

    def set(self, x, y, flow):
        flow = flow if flow > self.eps else 0.0
        self.adj[x][y] = flow
        self.adj[y][x] = flow

    def drop(self, x, y):
        del self.adj[x][y]
        del self.adj[y][x]

    def span(self, C):
        """Join the forest's components into one tree with zero-flow edges.

        Each component is joined to those before it by its cheapest entry
        to them (either direction).
        """
        n, m = self.n, self.m
        comp = np.full(n + m, -1)
        for start in range(n + m):
            if comp[start] >= 0:
                continue
            comp[start] = start
            queue = deque([start])
            while queue:
                x = queue.popleft()
                for y in self.adj[x]:
                    if comp[y] < 0:
                        comp[y] = start
                        queue.append(y)
        joined = comp == comp[0]
        for label in np.unique(comp):
            if label == comp[0]:
                continue
            mine = comp == label
            best = None
            for rows, cols in ((mine[:n], joined[n:]), (joined[:n], mine[n:])):
                r, c = np.nonzero(rows)[0], np.nonzero(cols)[0]
                if r.size and c.size:
                    sub = C[np.ix_(r, c)]
                    at = int(np.argmin(sub))
                    entry = (sub.flat[at], int(r[at // c.size]), int(c[at % c.size]))
                    best = entry if best is None or entry[0] < best[0] else best
            self.set(best[1], n + best[2], 0.0)
            joined |= mine

    def root(self, C):
        """Root at row 0: parents, depths and potentials.

        The potentials satisfy ``u_i + v_j = C_ij`` on every tree edge.
        Returns ``(u, v)``.
        """
        size = self.n + self.m
        parent = np.full(size, -1)
        depth = np.zeros(size, dtype=np.int64)
        pot = np.zeros(size)
        seen = np.zeros(size, dtype=bool)
        seen[0] = True
        stack = [0]
        while stack:
            x = stack.pop()
            for y in self.adj[x]:
                if seen[y]:
                    continue
                seen[y] = True
                parent[y], depth[y] = x, depth[x] + 1
                i, j = (x, y - self.n) if x < self.n else (y, x - self.n)
                pot[y] = C[i, j] - pot[x]
                stack.append(y)
        self.parent, self.depth = parent, depth
        return pot[:self.n], pot[self.n:]

    def path(self, x, y):
        """The tree edges from node ``x`` to node ``y``, in order."""
        left, right = [], []
        parent, depth = self.parent, self.depth
        while x != y:
            if depth[x] >= depth[y]:
                left.append((x, parent[x]))
                x = parent[x]
            else:
                right.append((parent[y], y))
                y = parent[y]
        return left + right[::-1]

    def degrees(self):
        """Positive entries per column."""
        n = self.n
        return np.array([sum(f > 0 for f in self.adj[n + j].values())
                         for j in range(self.m)])

    def cycle(self, i, j):
        """Entering ``(i, j)``: the cycle's losing and gaining tree edges.

        The tree path from column ``j`` to row ``i`` alternates edges that
        lose the pushed mass (the first, at ``j``) and edges that gain it.
        """
        edges = self.path(self.n + j, i)
        return edges[0::2], edges[1::2]

    def fits(self, j, losing, gaining, theta, deg, k):
        """Whether pushing ``theta`` around the cycle of entering ``(i, j)``
        leaves every column with at most ``k`` positive entries."""
        if theta <= self.eps:
            return True
        change = {j: 1}
        for edges, gains in ((losing, False), (gaining, True)):
            for x, y in edges:
                flow = self.adj[x][y]
                # A gaining edge at zero turns positive; a losing one that
                # gives all it has turns zero.
                if (flow <= self.eps) if gains else (flow - theta <= self.eps):
                    col = max(x, y) - self.n
                    change[col] = change.get(col, 0) + (1 if gains else -1)
        return all(deg[col] + d <= k for col, d in change.items() if d > 0)

    def push(self, i, j, losing, gaining, theta, leaving, deg):
        """Pivot: push ``theta`` around the cycle of entering ``(i, j)``, drop
        ``leaving``, and update the column degrees ``deg`` in place."""
        for x, y in losing:
            self.set(x, y, self.adj[x][y] - theta)
        for x, y in gaining:
            self.set(x, y, self.adj[x][y] + theta)
        self.drop(*leaving)
        self.set(i, self.n + j, theta)
        for col in {max(x, y) for x, y in losing + gaining} | {self.n + j}:
            deg[col - self.n] = sum(f > 0 for f in self.adj[col].values())

    def entries(self):
        rows, cols, values = [], [], []
        for i in range(self.n):
            for y, f in self.adj[i].items():
                if f > 0:
                    rows.append(i)
                    cols.append(y - self.n)
                    values.append(f)
        return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), \
            np.array(values)


def _walk(tree, start, cut, outward, limit=None):
    """Walk one side of the tree cut at edge ``(start, cut)``, breadth first.

    Returns the nodes reached from ``start`` (at most ``limit``, the nearest
    first), the parent of each on the walk (a dict), for each the smallest
    flow on the edges its cycle path loses mass on (edges crossed from a
    column to a row, walking towards ``start`` (``outward`` False) or away
    from it (True)), and whether the walk covered the whole side.
    """
    n = tree.n
    lightest, parent = {start: np.inf}, {start: -1}
    queue = deque([start])
    while queue:
        if limit is not None and len(lightest) >= limit:
            break
        x = queue.popleft()
        for y, flow in tree.adj[x].items():
            if y in lightest or (x == start and y == cut):
                continue
            # Towards start the edge is crossed from y to x, away from x to y.
            loses = (x >= n) if outward else (y >= n)
            lightest[y] = min(lightest[x], flow) if loses else lightest[x]
            parent[y] = x
            queue.append(y)
    nodes = np.fromiter(lightest.keys(), dtype=np.int64, count=len(lightest))
    return (nodes, parent,
            np.fromiter(lightest.values(), dtype=float, count=len(lightest)),
            not queue)


def _up(parent, x):
    """The walk's edges from ``x`` back to its start."""
    edges = []
    while parent[x] >= 0:
        edges.append((x, parent[x]))
        x = parent[x]
    return edges


def _degree_pivot(tree, C, k, deg, u, v):
    """One degree pivot on the fullest column; False where none qualifies.

    Each of the column's entries is tried as the leaving one, with its
    cheapest qualifying entering entry; the pivot of least cost increase
    (mass moved times reduced cost) is taken (measured on 9 uniform problems
    of 50-300 rows, k = 2: 0.1-7.9% above the exact plan's cost, against
    0.1-10.1% for the lightest entry alone). The entering column has fewer
    than ``k`` rows; only where none qualifies, a column at ``k`` may enter
    if the cycle empties one of its entries (with uniform masses the cycle's
    flows often tie: 300 x 200, k = 2, had no column with room from the
    start, every column holding 2-4 rows, and 14 such pivots reached a plan
    0.4% above the exact plan's cost).
    The potentials ``u`` and ``v`` are updated in place: the side of the
    leaving entry's row shifts by the entering entry's reduced cost.
    """
    n = tree.n
    over = np.nonzero(deg > k)[0]
    j = int(over[np.argmax(deg[over])])
    node = n + j
    # Each leaving entry's two sides: rows on r's side, columns on j's side,
    # and the lightest losing edge of each one's part of the cycle.
    sides = [(r, theta, _walk(tree, r, node, True, _WALK_LIMIT),
              _walk(tree, node, r, False, _WALK_LIMIT))
             for r, theta in tree.adj[node].items() if theta > 0]
    best = None
    for room in (k - 1, k):
        for r, theta, (nodes_r, parent_r, light_r, _), \
                (nodes_j, parent_j, light_j, _) in sides:
            keep = nodes_r < n
            rows, lr = nodes_r[keep], light_r[keep]
            keep = nodes_j >= n
            cols, lj = nodes_j[keep] - n, light_j[keep]
            keep = deg[cols] <= room
            cols, lj = cols[keep], lj[keep]
            if rows.size == 0 or cols.size == 0:
                continue
            reduced = C[np.ix_(rows, cols)] - u[rows, None] - v[None, cols]
            # (r, j) must be the lightest losing edge of the cycle.
            reduced[(lr[:, None] < theta) | (lj[None, :] < theta)] = np.inf
            order = np.argsort(reduced, axis=None, kind="stable")
            for at in order if room < k else order[:_FULL_TRIES]:
                rise = theta * reduced.flat[at]
                if not np.isfinite(rise) or (best is not None and rise >= best[0]):
                    break
                i, col = int(rows[at // cols.size]), int(cols[at % cols.size])
                # From column col to j, across (j, r), then from r to row i.
                edges = (_up(parent_j, n + col) + [(node, r)]
                         + [(y, x) for x, y in reversed(_up(parent_r, i))])
                losing, gaining = edges[0::2], edges[1::2]
                if not tree.fits(col, losing, gaining, theta, deg, k):
                    continue
                best = (rise, i, col, losing, gaining, theta, (r, node),
                        [x for x in sides if x[0] == r][0])
                break
        if best is not None:
            break
    if best is None:
        return False
    rise, i, col, losing, gaining, theta, cut, (_, _, walk_r, walk_j) = best
    tree.push(i, col, losing, gaining, theta, cut, deg)
    # One side shifts by the entering entry's reduced cost: one whose walk
    # covered it, else every potential is recomputed.
    shift = C[i, col] - u[i] - v[col]
    for (nodes, _, _, whole), sign in ((walk_r, 1.0), (walk_j, -1.0)):
        if whole:
            u[nodes[nodes < n]] += sign * shift
            v[nodes[nodes >= n] - n] -= sign * shift
            return True
    u[:], v[:] = tree.root(C)
    return True


def _cost_pivot(tree, C, k, deg, u, v, cand_rows, cand_cols, tol):
    """One improving pivot that keeps every column within ``k``; False if none."""
    n = tree.n
    reduced = C[cand_rows, cand_cols] - u[cand_rows] - v[cand_cols]
    for at in np.argsort(reduced, kind="stable")[:_COST_TRIES]:
        if reduced[at] >= -tol:
            return False
        i, j = int(cand_rows[at]), int(cand_cols[at])
        if n + j in tree.adj[i]:
            continue
        losing, gaining = tree.cycle(i, j)
        flows = [tree.adj[x][y] for x, y in losing]
        theta = min(flows)
        leaving = losing[int(np.argmin(flows))]
        if not tree.fits(j, losing, gaining, theta, deg, k):
            continue
        tree.push(i, j, losing, gaining, theta, leaving, deg)
        return True
    return False


def degree_capped_plan(rows, cols, values, C, k):
    """An exact plan's entries moved to at most ``k`` rows per column.

    Parameters
    ----------
    rows, cols, values : arrays
        The positive entries of an exact optimal plan (a vertex: a forest).
    C : ndarray of shape (n, m)
    k : int

    Returns
    -------
    (rows, cols, values) of the new plan's positive entries, with the same
    marginals, or None where the degree pivots found no way on, or where
    the excess over ``k`` times ``n + m`` exceeds ``_PIVOT_WORK``.
    """
    n, m = C.shape
    excess = np.maximum(np.bincount(cols, minlength=m) - k, 0).sum()
    if excess * (n + m) > _PIVOT_WORK:
        return None
    tree = _Tree(n, m, rows, cols, values)
    tree.span(C)
    deg = tree.degrees()
    u, v = tree.root(C)
    while (deg > k).any():
        if not _degree_pivot(tree, C, k, deg, u, v):
            return None
    u, v = tree.root(C)
    take = min(_CANDIDATE_ROWS, n)
    cand_rows = np.argpartition(C - u[:, None], take - 1, axis=0)[:take]
    cand_cols = np.broadcast_to(np.arange(m), cand_rows.shape).ravel()
    cand_rows = cand_rows.ravel()
    tol = 1e-12 * (np.abs(C).max() + 1.0)
    for _ in range(max(16, _COST_WORK // (n + m))):
        if not _cost_pivot(tree, C, k, deg, u, v, cand_rows, cand_cols, tol):
            break
        u, v = tree.root(C)
    return tree.entries()

