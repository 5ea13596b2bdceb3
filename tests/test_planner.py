"""The background planner on real gloo ranks with real DDP and DataLoaders with workers.

- Different prefetch depths per rank (``num_workers`` 0 against 3 workers × 4): no hang, the
  same plan at the same step on every rank, every epoch covered exactly once.
- The leader's plan request failing or timing out: every rank keeps the agreed plan, nothing
  hangs, the planner's group stays usable (later plans are adopted), one warning per streak.
- A real coordinator killed mid-run and restarted on the same address: training goes on
  without a per-window wait, and plans are used again within a few rounds of the restart.
- Windows shorter than the prefetch depth (an iterator's first boundaries cannot be reached):
  every request names the step its plan starts at (the coordinator's journal and window
  tallies say what trained), and ``metrics()`` carries the coordinator's figures on every rank.
"""

import dataclasses
import json
import os
import signal
import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import distributed
from distributed import free_port, run_ranks, stop_process
from shardbalance import WeightedDistributedSampler
from shardbalance._exceptions import CoordinatorUnavailable
from shardbalance._planner import _BACKOFF_MAX, BackgroundPlanner
from shardbalance.emulate import EmulatedSpeed

N, B, DIM, CLASSES = 384, 16, 6, 3  # 24 steps an epoch
#: Rank 0 loads in the main process, rank 1 keeps 12 batches in flight.
LOADERS = [dict(num_workers=0), dict(num_workers=3, prefetch_factor=4)]
SECRET = "planner-test-secret-0123456789abcdef"


def _data():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, DIM, generator=gen),
                         torch.randint(0, CLASSES, (N,), generator=gen), torch.arange(N))


def _scripted(sampler, fail=lambda request: None):
    """Plans from a script through the fetch seam (the leader's request): sizes move with each
    request, so every adopted plan is visible; ``fail(request number)`` may raise or sleep."""
    real, count = sampler.plan_source.fetch, {"n": 0, "asked": 0}

    def fetch(epoch, window):
        count["asked"] += 1
        fail(count["asked"])
        count["n"] += 1
        sizes = (4 + 2 * (count["n"] % 3), B - 4 - 2 * (count["n"] % 3))
        return dataclasses.replace(real(epoch, window), batch_sizes=sizes)

    sampler.plan_source.fetch = fetch


def _train(rank, world, weighting, epochs, fail_windows, log_path):
    """``fail_windows``: the leader's request number (1: the run's registration) -> fault."""
    data = _data()
    sampler = WeightedDistributedSampler(data, B, rebalance_every=2, seed=2, timeout_s=10,
                                         coordinator_log=log_path)

    def fail(request):
        kind = fail_windows.get(request)
        if kind == "timeout":
            time.sleep(0.3)  # a request that takes long, then gives up
        if kind:
            raise CoordinatorUnavailable(f"injected: {kind}")

    _scripted(sampler, fail)
    loader = DataLoader(data, batch_sampler=sampler, **LOADERS[rank])
    model = DDP(torch.nn.Sequential(EmulatedSpeed(1.0 + rank, per_sample_s=0.0002,
                                                  overhead_s=0.002),
                                    torch.nn.Linear(DIM, CLASSES)))
    # When each round starts against the newest step whose forward began (a pre-hook
    # registered before attach's runs first): a round starts once the step after its trigger
    # is being trained, not at the step boundary.
    forwards, starts = {"begun": -1}, []
    model.register_forward_pre_hook(
        lambda module, args: forwards.update(begun=sampler.ledger.peek().step))
    play = BackgroundPlanner._play

    def spy(self, rnd):
        starts.append((rnd.trigger, self.steps, self._ending is not None, forwards["begun"]))
        return play(self, rnd)

    BackgroundPlanner._play = spy
    sampler.attach(model, weighting=weighting)
    steps, seen = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for x, y, idx in loader:
                F.cross_entropy(model(x), y).backward()
                model.zero_grad()
                entry = sampler.last_trained
                assert entry.batch_size == len(y)
                steps.append((epoch, entry.step, entry.digest, len(y)))
                seen.append((epoch, idx))
    # The planner's group is still usable: one more collective on it.
    check = torch.ones(1)
    if sampler.planner.group is not None:
        dist.all_reduce(check, group=sampler.planner.group)
    history = list(sampler.planner.history)
    stats = dict(sampler.planner.stats, sender=sampler.session.sender.sent, starts=starts)
    del model
    dist.barrier()
    sampler.close()
    return (steps, seen, history, stats, [str(w.message) for w in caught
                                          if "no plan" in str(w.message)], float(check))


def _coverage(seen0, seen1, epochs):
    for epoch in range(epochs):
        got = torch.cat([i for e, i in seen0 + seen1 if e == epoch])
        assert sorted(got.tolist()) == list(range(N)), epoch


def _same_plans(steps0, steps1):
    assert [s[:3] for s in steps0] == [s[:3] for s in steps1]
    assert all(a[3] + b[3] == B for a, b in zip(steps0, steps1))


@pytest.mark.parametrize("weighting", ["hook", "output"])
def test_different_prefetch_depths_switch_to_the_same_plan_at_the_same_step(tmp_path,
                                                                           weighting):
    r0, r1 = run_ranks(_train, 2, weighting, 2, {}, str(tmp_path / "c.jsonl"), timeout_s=120)
    (steps0, seen0, history, stats, _, check), (steps1, seen1, history1, *_) = r0, r1
    _same_plans(steps0, steps1)
    _coverage(seen0, seen1, 2)
    assert history == history1 and check == 2.0
    # Plans switch only at window boundaries, and did inside epochs, more than once.
    changes = [cur[:2] for prev, cur in zip(steps0, steps0[1:]) if prev[2] != cur[2]]
    assert all(step % 2 == 0 for _, step in changes), changes
    assert sum(1 for _, step in changes if step > 0) >= 2, changes
    # Rank 1 runs 12 batches ahead: the agreed lead covers its prefetch depth.
    assert max(h[6] for h in history) >= 10, history
    # The first round had no earlier round's duration to go by: the lead it agrees (which the
    # next iterator's first round fires by) still counts one step for its own duration, plus
    # one (without it a run with one round in its first epoch landed the second epoch's first
    # plan a window late).
    first_lead, first_depth = history[0][6], history[0][7]
    assert first_lead == first_depth + 2, history
    assert stats["plans"] >= 2 and stats.get("failed", 0) == 0
    # Every round that fired during training (not at an iterator's last step, not drained at
    # the next one's start) started once the step after its trigger began its forward.
    during = [s for s in stats["starts"] if not s[2] and s[0] < s[1] - 1]
    assert len(during) >= 5 and all(begun > trigger for trigger, _, _, begun in during), \
        stats["starts"]
    # Measurements reached the coordinator with the leader's requests, none by stats messages.
    assert stats["records_sent"] >= 2 * 24 and stats["sender"] == 0, stats


def test_a_failing_or_slow_leader_request_keeps_the_agreed_plan_on_every_rank(tmp_path):
    # These requests of the leader fail: two streaks, one of them with a slow failure.
    fails = {3: "unreachable", 4: "timeout", 7: "unreachable"}
    r0, r1 = run_ranks(_train, 2, "hook", 4, fails, str(tmp_path / "c.jsonl"), timeout_s=150)
    (steps0, seen0, history, stats, warned0, check), (steps1, seen1, _, _, warned1, _) = r0, r1
    _same_plans(steps0, steps1)
    _coverage(seen0, seen1, 4)
    assert check == 2.0  # the group survived
    failed = [i for i, h in enumerate(history) if h[4] == "failed"]
    assert len(failed) == stats["failed"] == 3, history
    for i in failed:
        # Nothing installed by a failed round; the leader skips the next round(s) (backoff),
        # then a plan is adopted again.
        assert history[i][5] is None
        later = [h[4] for h in history[i + 1:]]
        assert "plan" in later[:_BACKOFF_MAX + 2], history
    # Every rank warned, once per failure streak, not once per window.
    assert warned0 and warned1 and len(warned0) == len(warned1) <= len(failed)


def _train_through_outage(rank, world, address, flag_path):
    data = _data()
    sampler = WeightedDistributedSampler(data, B, coordinator=address, rebalance_every=2,
                                         timeout_s=1, seed=4)
    loader = DataLoader(data, batch_sampler=sampler, **LOADERS[rank])
    model = DDP(torch.nn.Sequential(EmulatedSpeed(1.0 + rank, per_sample_s=0.0002,
                                                  overhead_s=0.004),
                                    torch.nn.Linear(DIM, CLASSES)))
    sampler.attach(model)
    steps, seen, epoch, after = [], [], 0, 0
    marks, t0 = [], time.monotonic()  # when each epoch ended (for a failure's message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while epoch < 60:
            sampler.set_epoch(epoch)
            for x, y, idx in loader:
                F.cross_entropy(model(x), y).backward()
                model.zero_grad()
                entry = sampler.last_trained
                steps.append((epoch, entry.step, entry.digest, len(y)))
                seen.append((epoch, idx))
            epoch += 1
            marks.append(round(time.monotonic() - t0, 2))
            if rank == 0:  # the outage lasts two epochs of rounds (see the test)
                with open(flag_path + ".epoch", "w") as f:
                    f.write(str(epoch))
            # Train until every rank saw the coordinator restarted, then three epochs more.
            restarted = torch.tensor([float(os.path.exists(flag_path))])
            dist.all_reduce(restarted, op=dist.ReduceOp.MIN)
            after += int(restarted.item())
            if after >= 3:
                break
    history, stats = list(sampler.planner.history), dict(sampler.planner.stats)
    del model
    dist.barrier()
    sampler.close()
    return steps, seen, history, stats, epoch, marks


def test_a_coordinator_killed_mid_run_costs_no_window_a_wait_and_is_used_again(tmp_path):
    port, journal = free_port(), str(tmp_path / "coordinator.jsonl")
    flag = str(tmp_path / "restarted")
    procs = [distributed.start_coordinator(port, journal, SECRET)]
    finished = threading.Event()

    def outage():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not finished.is_set():
            if os.path.exists(journal) and open(journal).read().count('"event": "plan"') >= 4:
                break
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        # Down for two whole epochs of training (each has rounds: the failures to count).
        progress = flag + ".epoch"

        def trained_epochs():
            try:
                return int(open(progress).read() or 0)
            except (OSError, ValueError):
                return 0

        killed_at = trained_epochs()
        while time.monotonic() < deadline + 60 and trained_epochs() < killed_at + 2:
            if finished.wait(0.05):
                return
        procs.append(distributed.start_coordinator(port, journal, SECRET))
        open(flag, "w").close()

    killer = threading.Thread(target=outage)
    killer.start()
    try:
        r0, r1 = run_ranks(_train_through_outage, 2, f"tcp://127.0.0.1:{port}", flag,
                           env={"SHARDBALANCE_TOKEN": SECRET}, timeout_s=180)
    finally:
        finished.set()
        killer.join(70)
        for proc in procs:
            stop_process(proc)
    assert not killer.is_alive()
    (steps0, seen0, history, stats, epochs, marks), (steps1, seen1, *_) = r0, r1
    _same_plans(steps0, steps1)
    _coverage(seen0, seen1, epochs)
    statuses = [h[4] for h in history]
    assert "failed" in statuses, (stats, marks, [(h[0], h[2], h[4]) for h in history])
    first_fail = statuses.index("failed")
    last_fail = len(statuses) - 1 - statuses[::-1].index("failed")
    assert "plan" in statuses[:first_fail]
    # After the restart a plan came again, within the backoff's cap of rounds.
    assert "plan" in statuses[last_fail + 1:last_fail + _BACKOFF_MAX + 2], statuses
    # The outage cost no window a wait: a generator waits only while a switch step is agreed
    # (after a plan arrived), never for the coordinator. Far fewer requests than rounds.
    assert stats.get("waits", 0) <= stats["plans"], stats
    assert stats["requests"] < stats["rounds"], stats
    assert "skipped" in statuses[first_fail:last_fail + 1] or first_fail == last_fail


def test_a_plan_request_carries_every_rank_measurements_and_bad_ones_change_nothing(tmp_path):
    from shardbalance._exceptions import CoordinatorError
    from shardbalance.client import CoordinatorClient
    from test_coordinator import SECRET as KEY, Running, plan_fields

    running = Running(str(tmp_path / "journal.jsonl"), KEY)
    client = CoordinatorClient(running.endpoint, KEY, timeout_s=2)
    try:
        assert client.plan(**plan_fields()).batch_sizes == (32, 32, 32)
        # One request of the leader with all three ranks' records: rank 2 is 4x as fast.
        records = [[rank, 0, s, 32, 0.001 + 32 * per_sample]
                   for rank, per_sample in enumerate([0.004, 0.002, 0.001])
                   for s in range(1, 8)]
        # A bad record (batch above B) refuses the whole request and counts none of them.
        with pytest.raises(CoordinatorError, match="exceeds the global batch"):
            client.plan(**plan_fields(epoch=1, records=records + [[1, 0, 9, 500, 0.1]]))
        with pytest.raises(CoordinatorError, match="bad plan record"):
            client.plan(**plan_fields(epoch=1, records=[[3, 0, 1, 32, 0.1]]))
        plan = client.plan(**plan_fields(epoch=1, records=records))
        assert plan.batch_sizes[2] > plan.batch_sizes[1] > plan.batch_sizes[0], plan
        # The coordinator still sees per-rank figures.
        busy = client.reported[plan.digest].busy_ms
        assert busy is not None and busy[0] > busy[1] > busy[2]
    finally:
        client.close()
        running.stop()


def _report_busy_loop(rank, world, journal):
    """No attach(): the loop reports busy time itself; rank 1 draws 3 batches ahead (as a
    loader with workers does), rank 0 none; one collective of the loop's own per step."""
    from collections import deque

    sampler = WeightedDistributedSampler(list(range(384)), 16, policy="affine",
                                         coordinator_log=journal, timeout_s=20)
    ahead = 3 if rank == 1 else 0
    plans = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches, queue = iter(sampler), deque()
        for _ in range(len(sampler)):
            while len(queue) <= ahead:
                nxt = next(batches, None)
                if nxt is None:
                    break
                queue.append(nxt)
            batch = queue.popleft()
            dist.all_reduce(torch.ones(1))
            sampler.report_busy(0.001 * len(batch) * (4 if rank == 0 else 1))
            plans.append(len(batch))
    sampler.close()
    # After close(), which ran every round the ranks triggered (read before it, a round the
    # planner thread had not begun yet under load was missed).
    in_background = sampler.planner is not None and sampler.planner.stats["rounds"] > 0
    return plans, in_background


def test_a_report_busy_loop_with_different_prefetch_depths_does_not_hang(tmp_path):
    # The first iterator has no training signal yet: it must not run a collective per step
    # at prefetch time (it keeps its plan); the next one plans in the background.
    results = run_ranks(_report_busy_loop, 2, str(tmp_path / "c.jsonl"), timeout_s=120,
                        env={"SHARDBALANCE_PEER_TIMEOUT": "30"})
    (plans0, bg0), (plans1, bg1) = results
    assert len(plans0) == len(plans1) == 2 * (384 // 16)
    assert [a + b for a, b in zip(plans0, plans1)] == [16] * len(plans0)
    assert bg0 and bg1


def _two_step_windows(data, batch, rank, journal):
    """Windows of 2 steps on a real (embedded) coordinator, each rank's loader as LOADERS
    says (rank 1's runs 12 batches ahead), rank 1 twice as fast; attached."""
    sampler = WeightedDistributedSampler(data, batch, rebalance_every=2, seed=3, timeout_s=20,
                                         coordinator_log=journal)
    loader = DataLoader(data, batch_sampler=sampler, **LOADERS[rank])
    model = DDP(torch.nn.Sequential(EmulatedSpeed(1.0 + rank, per_sample_s=0.0002,
                                                  overhead_s=0.002),
                                    torch.nn.Linear(DIM, CLASSES)))
    sampler.attach(model)
    return sampler, loader, model


def _short_windows(rank, world, journal):
    """Windows of 2 steps, a real coordinator, rank 1 loading 12 batches ahead: the prefetch
    depth is longer than a window."""
    data = _data()
    sampler, loader, model = _two_step_windows(data, B, rank, journal)
    metrics, switches = [], []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        previous = None
        for x, y, _ in loader:
            F.cross_entropy(model(x), y).backward()
            model.zero_grad()
            entry = sampler.last_trained
            if entry.digest != previous:
                switches.append((epoch, entry.step))
                previous = entry.digest
            if entry.step % 6 == 5:
                metrics.append((epoch, entry.step, sampler.metrics()))
    history = list(sampler.planner.history)
    del model
    dist.barrier()
    sampler.close()
    return metrics, history, switches


def test_windows_shorter_than_the_prefetch_ask_for_the_step_they_start_at(tmp_path):
    journal = tmp_path / "c.jsonl"
    (m0, history, switches), (m1, history1, switches1) = run_ranks(
        _short_windows, 2, str(journal), timeout_s=120)
    assert history == history1 and switches == switches1
    # metrics() is the same on every rank, coordinator figures included (the leader alone
    # asks; the others get them with the plan's broadcast).
    assert m0 == m1
    ends = [m for _, step, m in m0 if step == N // B - 1]
    assert len(ends) == 2
    for m in ends:  # each epoch's last plan was decided from every rank's measurements
        assert m["imbalance"] >= 1.0 and m["busy_ms/rank0"] > 0 and m["busy_ms/rank1"] > 0, m
    # Every round asks for a boundary after the window the generator had reached when the
    # round could first fire (by the depth agreed in the round before; none left in the epoch:
    # the next one), and its plan never starts before that boundary.
    depth, steps, previous = 0, N // B, None
    for epoch, kind, trigger, target, status, switch, lead, new_depth in history:
        earliest = 0 if previous is None or previous[0] != epoch else previous[2] + 1
        assert kind == "window" and target % 2 == 0
        assert target > earliest + depth or (earliest + depth) // 2 * 2 + 2 >= steps, history
        # A round that runs late at the end of an epoch gets a plan for the next iterator
        # (no switch step left in this one).
        assert status != "plan" or switch is None or switch >= target, history
        depth, previous = new_depth, (epoch, kind, trigger)
    # Rank 1's loader runs 12 batches ahead: each epoch's first windows are out of reach.
    assert max(h[7] for h in history) >= 10, history
    # The coordinator journalled a plan for each window a round got a plan for, and none for
    # a window no round asked for (besides the run's first request); a plan on time started
    # on every rank at the window its record names.
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    asked = [(r["epoch"], r["window"]) for r in records if r.get("event") == "plan"]
    assert {(h[0], h[3]) for h in history if h[4] == "plan"} <= set(asked), asked
    assert set(asked) <= {(0, 0)} | {(h[0], h[3]) for h in history}, asked
    on_time = [(h[0], h[5]) for h in history if h[4] == "plan" and h[5] == h[3]]
    assert on_time and set(on_time) <= set(switches), (on_time, switches)


def _metrics_every_step(rank, world, journal):
    n = 16 * 120
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, DIM, generator=gen),
                         torch.randint(0, CLASSES, (n,), generator=gen))
    sampler, loader, model = _two_step_windows(data, 16, rank, journal)
    seen = []
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        seen.append((sampler.last_trained.step, sampler.metrics()))
    del model
    dist.barrier()
    sampler.close()
    return seen


def test_metrics_are_the_same_on_every_rank_however_far_plans_are_agreed_ahead(tmp_path):
    """Windows of 2 steps, rank 1's loader 12 batches ahead: many agreed plans wait ahead of
    the step being trained. Every rank keeps the coordinator's figures for each installed plan
    (the client's cache of 8, which the leader's own requests also fill, dropped them, and
    the leader sooner than the others)."""
    seen0, seen1 = run_ranks(_metrics_every_step, 2, str(tmp_path / "coordinator.jsonl"),
                             timeout_s=150)
    assert [s for s, _ in seen0] == [s for s, _ in seen1] == list(range(120))
    assert all(m0 == m1 for (_, m0), (_, m1) in zip(seen0, seen1)), \
        [s for (s, m0), (_, m1) in zip(seen0, seen1) if m0 != m1]
    with_figures = [s for s, m in seen0 if "busy_ms/rank0" in m]
    # From the first plan the coordinator decided with measurements on, every step has them.
    assert with_figures and len(with_figures) >= 120 - with_figures[0] - 4, with_figures


def _pause_at_waiting_rounds(rank, world):
    """One rank: leave the first epoch right after training the trigger of a round that waits
    for the next forward and spend a second elsewhere (a validation pass); in the second, stay
    a second after such a trigger (a checkpoint); train a third, and a fourth in micro-batches
    (each step's batch in four forwards), noting the step and micro-batch being trained as each
    round starts."""
    data = _data()
    sampler = WeightedDistributedSampler(data, B, rebalance_every=2, seed=4, timeout_s=10,
                                         micro_batch_size=B // 4)
    loader = DataLoader(data, batch_sampler=sampler)
    model = DDP(torch.nn.Sequential(EmulatedSpeed(1.0, per_sample_s=0.0002, overhead_s=0.002),
                                    torch.nn.Linear(DIM, CLASSES)))
    sampler.attach(model)
    training, starts = {"step": -1, "micro": 0}, []
    play = BackgroundPlanner._play

    def spy(self, rnd):
        if self.epoch == 3:
            starts.append((rnd.trigger, self.steps, self._ending is not None,
                           training["step"], training["micro"]))
        return play(self, rnd)

    BackgroundPlanner._play = spy
    paused = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for x, y, _ in loader:
            F.cross_entropy(model(x), y).backward()
            model.zero_grad()
            step, planner = sampler.last_trained.step, sampler.planner
            with planner._cv:
                waiting = planner._round is not None and planner._round.trigger == step \
                    and not planner._inflight and step < N // B - 1
            if epoch < 2 and step >= 6 and waiting and len(paused) == epoch:
                paused.append((epoch, step))
                if epoch == 0:
                    break
                time.sleep(1.0)
        if epoch == 0:
            time.sleep(1.0)
    sampler.set_epoch(3)
    for micro, scale, last in sampler.accumulate(loader, model):
        x, y, _ = micro
        (F.cross_entropy(model(x), y) * scale).backward()
        training["micro"] = 0 if last else training["micro"] + 1
        if last:
            training["step"] += 1
            model.zero_grad()
    history = list(sampler.planner.history)
    del model
    sampler.close()
    return paused, history, starts


def test_a_round_waiting_through_a_pause_does_not_count_the_pause(tmp_path):
    ((paused, history, starts),) = run_ranks(_pause_at_waiting_rounds, 1, timeout_s=60)
    assert [epoch for epoch, _ in paused] == [0, 1], (paused, history)
    # Micro-batches: a round waits for the next step's forward, not for its trigger step's
    # next micro-batch (each round noted the step trained since, and that step's micro-batch).
    during = [s for s in starts if not s[2] and s[0] < s[1] - 1]
    assert len(during) >= 5 and all(step >= trigger for trigger, _, _, step, _ in during), \
        starts
    # The rounds that waited (one drained at the next epoch's start, one through a second
    # without a forward) ran after the pause; the second is not their duration: the leads
    # agreed after them stay a few steps (~3 ms steps: counting the second made them hundreds).
    after = [h for h in history if h[0] >= 1]
    assert after and max(h[6] for h in after) <= 8, history
