"""Plan decision time and steady-state efficiency of a policy from 8 to 4096 simulated ranks.

    python benchmarks/simulate_scale.py                 # ranks 8 64 512 4096, affine
    python benchmarks/simulate_scale.py --profile       # also profile one decide() at the largest k

Measured (2-core shared CPU box, Python 3.11, numpy; decide times vary ~1.5x with load: a
second 4096-rank run gave median 2391 / max 4046 ms):

    affine, speeds lognormal:0.5, noise 0.1, 400 steps, window 20, B = 64/rank, seed 0
     ranks decide ms med      max  step ms   oracle       T* efficiency  T* eff  speedup  ideal  wall s
         8           4.6     10.6   127.42   127.39   112.25     100.0%   88.1%     1.40   1.40     0.1
        64          35.3    106.0   148.77   148.34   120.96      99.7%   81.3%     2.90   2.91     0.8
       512         474.7    759.3   161.08   160.05   123.82      99.4%   76.9%     6.04   6.08     8.8
      4096        3654.3   9970.4   167.36   166.44   123.36      99.5%   73.7%     5.81   5.84    73.9

Decision time is linear in ranks x history rows, and far over budget at 4096 ranks. The
profile (``--profile``, last decide at 4096 ranks, 380 history rows, 7.0 s under cProfile) is
all ``policies.fit_cost_model``: ``_segments`` 58 % (112k ``np.median`` calls on 16-step
segments, ~27 per rank, ~30 us of numpy dispatch each), ``_fit_line`` 35 % (two fits per rank,
70k ``np.average`` calls), ``_relative_error`` 6 %. ``plan.water_fill``/``apportion`` take
~20 ms and ~5 ms at 4096 ranks. The fix is to vectorise the fit across ranks (every rank's
history covers the same steps: one (k, n) matrix, segment medians in one call), or to cache
closed segments' medians in the coordinator (needs segments anchored at the start of a run of
one batch size rather than at its newest step, which shifts every window).

Each row is one :func:`shardbalance.simulate.simulate` run (lognormal:0.5 speeds, noise 0.1,
400 steps in windows of 20, lag one window, B = 64 per rank, seed 0): the real ``decide()`` on
the history the coordinator would hold. ``decide ms`` is wall time of each window's decide()
call (median and max over the windows). ``efficiency`` is the steady-state (second half) step
of the oracle (the equal-finish optimum plan run on the same noise draws) over the policy's
step; ``T* eff`` the same against the noiseless optimum, which at large k no plan can reach
because every step waits for the slowest of k noisy ranks; ``speedup`` is the equal split's
step over the policy's, ``ideal`` the equal split's over the oracle's.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from shardbalance.simulate import SimulationConfig, simulate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 4096])
    p.add_argument("--speeds", default="lognormal:0.5")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--policy", default="affine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="profile one decide() at the largest k with a full history")
    return p.parse_args(argv)


def _profile(args, ranks: int) -> str:
    """cProfile of the last window's decide() of a run at ``ranks`` (the longest history)."""
    from shardbalance import simulate as sim

    real_decide = sim.decide
    calls = []

    def decide(policy, inp):
        calls.append(None)
        if len(calls) < -(-args.steps // args.window):
            return real_decide(policy, inp)
        profiler = cProfile.Profile()
        out = profiler.runcall(real_decide, policy, inp)
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf).sort_stats("cumulative")
        stats.print_stats(r"policies|plan|numpy.*(median|average|mean)", 18)
        calls.append(buf.getvalue())
        return out

    sim.decide = decide
    try:
        simulate(SimulationConfig(ranks=ranks, speeds=args.speeds, noise=args.noise,
                                  steps=args.steps, window=args.window, policy=args.policy,
                                  seed=args.seed))
    finally:
        sim.decide = real_decide
    return calls[-1]


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"{args.policy}, speeds {args.speeds}, noise {args.noise:g}, {args.steps} steps, "
          f"window {args.window}, B = 64/rank, seed {args.seed}")
    print(f"{'ranks':>6} {'decide ms med':>13} {'max':>8} {'step ms':>8} {'oracle':>8} "
          f"{'T*':>8} {'efficiency':>10} {'T* eff':>7} {'speedup':>8} {'ideal':>6} {'wall s':>7}")
    for k in args.ranks:
        t0 = time.perf_counter()
        result = simulate(SimulationConfig(ranks=k, speeds=args.speeds, noise=args.noise,
                                           steps=args.steps, window=args.window,
                                           policy=args.policy, seed=args.seed))
        wall = time.perf_counter() - t0
        s = result.summary
        print(f"{k:>6} {s.decision_ms_median:>13.1f} {s.decision_ms_max:>8.1f} "
              f"{s.steady_step_s * 1e3:>8.2f} {s.steady_oracle_s * 1e3:>8.2f} "
              f"{s.steady_optimum_s * 1e3:>8.2f} {s.efficiency:>10.1%} "
              f"{s.steady_optimum_s / s.steady_step_s:>7.1%} {s.speedup:>8.2f} "
              f"{s.steady_equal_s / s.steady_oracle_s:>6.2f} {wall:>7.1f}", flush=True)
    if args.profile:
        print(f"\nprofile of the last decide() at {max(args.ranks)} ranks:")
        print(_profile(args, max(args.ranks)))


if __name__ == "__main__":
    main()
