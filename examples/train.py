"""Train a small model with shardbalance, on CPUs (gloo) or GPUs (nccl).

    # CPU: three ranks emulating GPUs of relative speed 1, 2 and 4
    torchrun --nproc_per_node=3 examples/train.py --emulate-speeds 1,2,4
    # the same emulated cluster with torch's DistributedSampler, to compare
    torchrun --nproc_per_node=3 examples/train.py --emulate-speeds 1,2,4 --sampler distributed
    # GPUs: one rank per GPU, no flags needed
    torchrun --nproc_per_node=8 examples/train.py

    # checkpoint every 4 steps and resume after a crash (torchrun restarts the ranks)
    torchrun --nproc_per_node=2 --max-restarts=1 examples/train.py --emulate-speeds 1,3 \
        --checkpoint ckpt.pt --checkpoint-every 4 --simulate-failure 10

The data is generated (a fixed random teacher network labels Gaussian inputs), so the script
needs no download. Rank 0 prints one line per epoch: time, throughput, loss and the plan, and
one with ``sampler.metrics()`` (what the coordinator measured when it decided the plan).
``--metrics-out FILE`` also writes those lines as JSON for benchmarks; with
``--check-coverage`` each line also counts how often every sample was trained in the epoch,
over all ranks (``coverage``: distinct samples and the lowest and highest count).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from shardbalance import WeightedDistributedSampler
from shardbalance.emulate import EmulatedSpeed, parse_speeds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sampler", choices=["weighted", "distributed"], default="weighted")
    p.add_argument("--policy", default="affine")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples", type=int, default=6144, help="dataset size N")
    p.add_argument("--global-batch-size", type=int, default=192)
    p.add_argument("--initial-weights", default=None,
                   help="comma-separated per-rank weights of the first plan (fixed for --policy "
                        "static), or 'probe': time two batch sizes on every rank first")
    p.add_argument("--max-batch-size", default=None,
                   help="per-rank cap: one integer, comma-separated per rank, or 'auto' (from "
                        "free CUDA memory, measured by the probe)")
    p.add_argument("--weighting", choices=["hook", "output"], default="hook",
                   help="gradient weighting: a DDP comm hook (exact for any loss) or the "
                        "gradient of the model's output (no comm hook, cheaper)")
    p.add_argument("--rebalance-every", type=int, default=None, help="steps per plan window")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emulate-speeds", default=None,
                   help="comma-separated relative speeds, one per rank (CPU emulation)")
    p.add_argument("--per-sample-ms", type=float, default=2.0,
                   help="emulated compute per sample at speed 1")
    p.add_argument("--overhead-ms", type=float, default=5.0, help="emulated fixed cost per step")
    p.add_argument("--slowdown", default=None, metavar="STEP:RANK:FACTOR",
                   help="from global step STEP on, rank RANK runs FACTOR times slower "
                        "(emulated throttling; needs --emulate-speeds)")
    p.add_argument("--metrics-out", default=None, help="rank 0 appends one JSON line per epoch")
    p.add_argument("--check-coverage", action="store_true",
                   help="count every sample's uses per epoch over all ranks (one all-reduce of "
                        "N counters per epoch) and report them in each epoch's line")
    p.add_argument("--coordinator-log", default=None, help="journal of the embedded coordinator")
    p.add_argument("--checkpoint", default=None,
                   help="save model, optimizer and sampler here; resume from it if it exists")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every this many steps inside an epoch")
    p.add_argument("--simulate-failure", type=int, default=None, metavar="STEP",
                   help="the last rank dies at this global step of the first attempt "
                        "(to try torchrun --max-restarts)")
    return p.parse_args(argv)


def _weights_arg(text):
    if text is None or text == "probe":
        return text
    return [float(w) for w in text.split(",")]


def _cap_arg(text):
    if text is None or text == "auto":
        return text
    caps = [int(c) for c in text.split(",")]
    return caps[0] if len(caps) == 1 else caps


def save_checkpoint(path: str, model, opt, sampler, epoch: int) -> None:
    """Rank 0 writes atomically; the sampler state is the run's position (epoch, sample)."""
    state = {"model": model.module.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
             "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _metrics_line(metrics: dict, world: int) -> str:
    """sampler.metrics() in one line: the plan's figures, then each rank's."""
    parts = [f"{key} {metrics[key]:g}" for key in ("imbalance", "predicted_step_ms",
                                                    "equal_step_ms", "speedup_vs_equal")
             if key in metrics]
    for name in ("busy_ms", "samples_per_s"):
        values = [metrics.get(f"{name}/rank{r}") for r in range(world)]
        if any(v is not None for v in values):
            parts.append(f"{name} {values}")
    return ", ".join(parts) or "(no measurements yet)"


def make_dataset(num_samples: int, dim: int = 32, classes: int = 10) -> TensorDataset:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, dim, generator=gen)
    teacher = torch.randn(dim, classes, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(num_samples, classes, generator=gen)).argmax(dim=1)
    return TensorDataset(x, y)


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset[i] + (i,)``: each batch also carries its sample indices (for --check-coverage)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], index)


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(args.seed)

    dataset = make_dataset(args.samples)
    if args.check_coverage:
        dataset = IndexedDataset(dataset)
    if args.sampler == "weighted":
        sampler = WeightedDistributedSampler(
            dataset, global_batch_size=args.global_batch_size, seed=args.seed,
            policy=args.policy, rebalance_every=args.rebalance_every,
            initial_weights=_weights_arg(args.initial_weights),
            max_batch_size=_cap_arg(args.max_batch_size),
            coordinator_log=args.coordinator_log)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers)
    else:
        if args.global_batch_size % world:
            raise SystemExit(f"--global-batch-size {args.global_batch_size} must divide by "
                             f"{world} ranks for DistributedSampler")
        sampler = DistributedSampler(dataset, seed=args.seed)
        loader = DataLoader(dataset, sampler=sampler, batch_size=args.global_batch_size // world,
                            num_workers=args.num_workers)

    layers = [torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)]
    emulated = None
    if args.emulate_speeds:
        speed = parse_speeds(args.emulate_speeds, world)[rank]
        emulated = EmulatedSpeed(speed, args.per_sample_ms / 1e3, args.overhead_ms / 1e3)
        layers.insert(0, emulated)
    slow_step, slow_rank, slow_factor = (None, None, None)
    if args.slowdown:
        step_text, rank_text, factor_text = args.slowdown.split(":")
        slow_step, slow_rank, slow_factor = int(step_text), int(rank_text), float(factor_text)
    model = DDP(torch.nn.Sequential(*layers).to(device),
                device_ids=[device.index] if cuda else None)
    if args.sampler == "weighted":
        sampler.attach(model, weighting=args.weighting)
        if args.initial_weights == "probe" or args.max_batch_size == "auto":
            # Random inputs of the right shape, no all-reduce (no_sync): the run's samples and
            # random state are untouched.
            def probe_step(b: int, net=model) -> None:
                x = torch.randn(b, 32, device=device)
                y = torch.randint(0, 10, (b,), device=device)
                F.cross_entropy(net(x), y).backward()

            weights = sampler.probe(probe_step, model=model)
            if rank == 0:
                print(f"probe: initial weights {[round(w, 3) for w in weights]}, caps "
                      f"{list(sampler.max_sizes)}", flush=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    first_epoch = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, map_location=device)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        first_epoch = state["epoch"]
        if state["sampler"] is not None and args.sampler == "weighted":
            sampler.load_state_dict(state["sampler"])
            first_epoch = state["sampler"]["epoch"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} at epoch {first_epoch} "
                  f"(restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')})", flush=True)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    global_step = 0

    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dist.barrier()
        start = time.perf_counter()
        total_loss, seen, steps = torch.zeros((), device=device), 0, 0
        uses = torch.zeros(len(dataset), dtype=torch.int64, device=device) \
            if args.check_coverage else None
        for x, y, *indices in loader:
            if uses is not None:  # index_add_, not uses[i] += 1: repeats must count
                index = indices[0].to(device)
                uses.index_add_(0, index, torch.ones_like(index))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)  # mean over the local batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.detach() * len(y)
            seen += len(y)
            steps += 1
            global_step += 1
            if emulated is not None and global_step == slow_step and rank == slow_rank:
                emulated.speed /= slow_factor
            if args.checkpoint and args.checkpoint_every and global_step % args.checkpoint_every == 0:
                if rank == 0:
                    save_checkpoint(args.checkpoint, model, opt, sampler, epoch)
                dist.barrier()
            if args.simulate_failure == global_step and first_attempt and rank == world - 1:
                print(f"rank {rank}: simulated failure at step {global_step}", flush=True)
                os._exit(1)
        dist.barrier()
        elapsed = time.perf_counter() - start
        stats = torch.tensor([total_loss.item(), float(seen)], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        if uses is not None:
            dist.all_reduce(uses)
        plan = list(sampler.batch_sizes) if args.sampler == "weighted" else \
            [args.global_batch_size // world] * world
        if rank == 0:
            record = {"epoch": epoch, "seconds": round(elapsed, 4),
                      "samples_per_s": round(stats[1].item() / elapsed, 1),
                      "loss": round(stats[0].item() / stats[1].item(), 5), "plan": plan,
                      "steps": steps, "sampler": args.sampler}
            if uses is not None:
                record["coverage"] = {"distinct": int((uses > 0).sum()),
                                      "min": int(uses.min()), "max": int(uses.max())}
            print(f"epoch {epoch} | {elapsed:.2f} s | {record['samples_per_s']:.0f} samples/s "
                  f"| loss {record['loss']:.4f} | plan {plan}", flush=True)
            if args.sampler == "weighted":
                # The same dict on every rank: logging it from rank 0 shows all ranks. A
                # tracker takes it as it is, e.g. writer.add_scalar(f"shardbalance/{k}", v, step).
                record["shardbalance"] = metrics = sampler.metrics()
                print(f"epoch {epoch} | metrics {_metrics_line(metrics, world)}", flush=True)
            if args.metrics_out:
                with open(args.metrics_out, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
        if args.checkpoint and rank == 0:
            # The sampler's position is the end of this epoch: resuming starts the next one.
            save_checkpoint(args.checkpoint, model, opt, sampler, epoch + 1)

    dist.barrier()
    del model
    if args.sampler == "weighted":
        sampler.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
