"""Plan decision time and steady-state efficiency of a policy from 8 to 4096 simulated ranks.

    python benchmarks/simulate_scale.py                 # ranks 8 64 512 4096, affine
    python benchmarks/simulate_scale.py --profile       # also profile one decide() at the largest k

Measured (2-core shared CPU box, Python 3.11, numpy 2.4, another benchmark running beside it;
decide times vary ~2x with load):

    affine, speeds lognormal:0.5, noise 0.1, 400 steps, window 20, B = 64/rank, seed 0
     ranks decide ms med      max  step ms   oracle       T* efficiency  T* eff  speedup  ideal  wall s
         8           3.9      9.9   128.84   127.39   112.25      98.9%   87.1%     1.38   1.40     0.2
        64           6.9     11.1   148.45   148.34   120.96      99.9%   81.5%     2.90   2.91     0.2
       512          24.5     39.5   160.59   160.05   123.82      99.7%   77.1%     6.06   6.08     0.6
      4096          79.3    262.6   167.19   166.44   123.36      99.5%   73.8%     5.81   5.84     3.2

The fit is vectorised across ranks and segments (one sort for all segment medians, prefix sums
for the fits), so a decision costs tens of milliseconds at 4096 ranks; before that it was
2.4-3.7 s (per-rank, per-segment numpy calls). At 4096 ranks the steady state is within 0.5 %
of the oracle; the oracle itself is 26 % above the noiseless optimum T* because every step
waits for the slowest of 4096 noisy ranks.

The ``curve`` policy at 4096 ranks with flat-then-linear curves (load average 14-17: every
figure here is 2-4x its idle value, the ratios are what to read):

    python benchmarks/simulate_scale.py --ranks 4096 --policy curve --curve flat:48 \
        --new-shape-ms 20 --time-decide 5
     ranks decide ms med      max  step ms   oracle       T* efficiency ...
      4096         386.9    779.5   172.43   166.30   136.13      96.4% ...
    decide() at 4096 ranks, last window's input, 5 calls each, interleaved:
      curve: median 855 ms, min 644 ms
      affine: median 523 ms, min 506 ms

A curve decision cost 0.25-0.6 s at 4096 ranks on an idle machine, 5-8x an affine one. Now it
stacks the history once, drops a new shape's first steps per run instead of per row, searches
the equal finish by safeguarded false position instead of ~50 bisection steps and refines by
re-evaluating only the two ranks a move changes: 1.6-1.7x an affine decision. The same input
decided by the previous version (commit 4dbfc7f, imported beside this one, calls interleaved,
5 each, load 7-17): median 1832-3294 ms before, 526-1311 ms after (2.4-3.5x less).

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
    p.add_argument("--curve", default="affine",
                   help="the simulator's busy-time curve: affine, flat:F, step:Q (see simulate.py)")
    p.add_argument("--new-shape-ms", type=float, default=0.0,
                   help="one-off ms of each of the first 2 steps at a new batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-decide", type=int, default=0, metavar="N",
                   help="time N decide() calls of --policy and of affine, interleaved, on the "
                        "last window's input at the largest k")
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
                                  seed=args.seed, curve=args.curve,
                                  new_shape_s=args.new_shape_ms / 1e3))
    finally:
        sim.decide = real_decide
    return calls[-1]


def _time_decide(args, ranks: int) -> str:
    """Median and min of ``args.time_decide`` decide() calls per policy, interleaved, on the
    input of the last window of a run at ``ranks`` (the longest history)."""
    import statistics

    from shardbalance import simulate as sim

    real_decide = sim.decide
    inputs = []

    def decide(policy, inp):
        inputs.append(inp)
        return real_decide(policy, inp)

    sim.decide = decide
    try:
        simulate(SimulationConfig(ranks=ranks, speeds=args.speeds, noise=args.noise,
                                  steps=args.steps, window=args.window, policy=args.policy,
                                  seed=args.seed, curve=args.curve,
                                  new_shape_s=args.new_shape_ms / 1e3))
    finally:
        sim.decide = real_decide
    policies = list(dict.fromkeys([args.policy, "affine"]))
    times = {p: [] for p in policies}
    for _ in range(args.time_decide):
        for p in policies:
            t0 = time.perf_counter()
            real_decide(p, inputs[-1])
            times[p].append(time.perf_counter() - t0)
    return "\n".join(f"  {p}: median {statistics.median(t) * 1e3:.0f} ms, min "
                     f"{min(t) * 1e3:.0f} ms" for p, t in times.items())


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"{args.policy}, curve {args.curve}, speeds {args.speeds}, noise {args.noise:g}, "
          f"{args.steps} steps, "
          f"window {args.window}, B = 64/rank, seed {args.seed}")
    print(f"{'ranks':>6} {'decide ms med':>13} {'max':>8} {'step ms':>8} {'oracle':>8} "
          f"{'T*':>8} {'efficiency':>10} {'T* eff':>7} {'speedup':>8} {'ideal':>6} {'wall s':>7}")
    for k in args.ranks:
        t0 = time.perf_counter()
        result = simulate(SimulationConfig(ranks=k, speeds=args.speeds, noise=args.noise,
                                           steps=args.steps, window=args.window,
                                           policy=args.policy, seed=args.seed, curve=args.curve,
                                           new_shape_s=args.new_shape_ms / 1e3))
        wall = time.perf_counter() - t0
        s = result.summary
        print(f"{k:>6} {s.decision_ms_median:>13.1f} {s.decision_ms_max:>8.1f} "
              f"{s.steady_step_s * 1e3:>8.2f} {s.steady_oracle_s * 1e3:>8.2f} "
              f"{s.steady_optimum_s * 1e3:>8.2f} {s.efficiency:>10.1%} "
              f"{s.steady_optimum_s / s.steady_step_s:>7.1%} {s.speedup:>8.2f} "
              f"{s.steady_equal_s / s.steady_oracle_s:>6.2f} {wall:>7.1f}", flush=True)
    if args.time_decide:
        print(f"\ndecide() at {max(args.ranks)} ranks, last window's input, "
              f"{args.time_decide} calls each, interleaved:")
        print(_time_decide(args, max(args.ranks)))
    if args.profile:
        print(f"\nprofile of the last decide() at {max(args.ranks)} ranks:")
        print(_profile(args, max(args.ranks)))


if __name__ == "__main__":
    main()
