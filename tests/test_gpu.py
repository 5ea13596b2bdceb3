"""CUDA paths: busy time from CUDA events, both gradient weightings on nccl, memory-derived
caps, the example on a GPU.

Skipped without CUDA (CI has none); run on a GPU machine with ``python -m pytest tests/test_gpu.py``.
"""

import json
import time
from datetime import timedelta

import pytest
import torch

from distributed import free_port, run_ranks, torchrun

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_busy_clock_reads_cuda_events_without_waiting():
    from shardbalance._weighting import BusyClock

    clock = BusyClock(torch.device("cuda"))
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    start = clock.now()
    for _ in range(20):
        a = (a @ a).tanh_()
    end = clock.now()
    clock.measure(start, end, "work")
    # Right after enqueueing, the end event is usually still pending: nothing is read yet and
    # nothing waited for the device.
    early = clock.ready()
    torch.cuda.synchronize()
    late = early or clock.ready()
    assert len(late) == 1 and late[0][0] == "work"
    assert 0 < late[0][1] < 5.0


@pytest.fixture
def nccl_world_of_one(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timedelta(seconds=60))
    yield
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("weighting", ["hook", "output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weighting_on_nccl_gives_the_reference_gradient_and_cuda_busy_times(
        nccl_world_of_one, tmp_path, dtype, weighting):
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    from shardbalance import WeightedDistributedSampler

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 64, generator=gen), torch.randint(0, 4, (512,),
                                                                              generator=gen))
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 4)).cuda().to(dtype)
    reference = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 4)).cuda().to(dtype)
    reference.load_state_dict(net.state_dict())
    sampler = WeightedDistributedSampler(data, global_batch_size=64, policy="affine",
                                         coordinator_log=str(tmp_path / "c.jsonl"))
    model = DDP(net, device_ids=[0])
    sampler.attach(model, weighting=weighting)
    loader = DataLoader(data, batch_sampler=sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            x, y = x.cuda().to(dtype), y.cuda()
            model.zero_grad()
            F.cross_entropy(model(x).float(), y).backward()
            if epoch == 0 and step == 0:
                reference.zero_grad()
                F.cross_entropy(reference(x).float(), y).backward()
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else \
                    dict(rtol=1e-2, atol=1e-3)
                for got, want in zip(net.parameters(), reference.parameters()):
                    torch.testing.assert_close(got.grad, want.grad, **tol)
    torch.cuda.synchronize()
    time.sleep(0.1)
    busy = sampler.recent_busy
    # Each epoch's first step and DDP's first iteration are discarded; the rest were timed
    # with CUDA events and read back without a synchronize in the hook.
    assert len(busy) >= 2 * len(sampler) - 4
    assert all(0 < rec[3] < 5.0 and rec[2] == 64 for rec in busy)
    del model
    sampler.close()


def test_auto_caps_come_from_free_cuda_memory_and_the_measured_peaks():
    from shardbalance import WeightedDistributedSampler

    torch.cuda.set_device(0)
    # ~16 KiB of activations per sample: a large global batch cannot fit in one device.
    net = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.ReLU(),
                              torch.nn.Linear(4096, 10)).cuda()
    big = 1 << 30
    sampler = WeightedDistributedSampler(range(big), global_batch_size=big, num_replicas=1,
                                         rank=0, policy="equal", max_batch_size="auto",
                                         batch_size_multiple=8)
    sampler.probe(lambda b: net(torch.randn(b, 256, device="cuda")).sum().backward(),
                  sizes=(256, 1024), model=net, memory_fraction=0.5)
    cap = sampler.max_sizes[0]
    assert 0 < cap < big and cap % 8 == 0
    # A step at a quarter of the cap fits in the half of the memory the cap was cut to.
    free, _ = torch.cuda.mem_get_info()
    budget = 0.5 * (free + torch.cuda.memory_reserved())
    torch.cuda.reset_peak_memory_stats()
    net(torch.randn(cap // 4, 256, device="cuda")).sum().backward()
    assert torch.cuda.max_memory_allocated() < budget
    net.zero_grad(set_to_none=True)
    sampler.close()


def test_example_trains_on_a_gpu_without_flags(tmp_path):
    metrics = tmp_path / "m.jsonl"
    torchrun(1, "--epochs", "2", "--metrics-out", str(metrics), "--coordinator-log",
             str(tmp_path / "c.jsonl"), "--num-workers", "0", timeout_s=300)
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(epochs) == 2 and epochs[-1]["loss"] < epochs[0]["loss"]


def _two_ranks_on_cuda(rank, world, weighting):
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    from shardbalance import WeightedDistributedSampler

    # Both ranks share device 0 (gloo all-reduces CUDA tensors); the plan is uneven, so a
    # wrong weight cannot match the reference by accident as it can with b_i/B = 1.
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 32, generator=gen), torch.randint(0, 4, (256,),
                                                                              generator=gen),
                         torch.arange(256))
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 4)).cuda()
    sampler = WeightedDistributedSampler(data, global_batch_size=32, policy="static",
                                         initial_weights=[1, 3], seed=2)
    model = DDP(net, device_ids=[0])
    sampler.attach(model, weighting=weighting)
    out = []
    for step, (x, y, idx) in enumerate(DataLoader(data, batch_sampler=sampler)):
        model.zero_grad()
        F.cross_entropy(model(x.cuda()), y.cuda()).backward()
        out.append(([p.grad.cpu() for p in model.parameters()], idx))
        if step == 3:
            break
    torch.cuda.synchronize()
    time.sleep(0.1)
    busy = list(sampler.recent_busy)
    del model
    sampler.close()
    return out, busy, sampler.batch_sizes


@pytest.mark.parametrize("weighting", ["hook", "output"])
def test_two_ranks_with_an_uneven_plan_give_the_reference_gradient_on_cuda(weighting):
    import torch.nn.functional as F

    results = run_ranks(_two_ranks_on_cuda, 2, weighting, timeout_s=180)
    assert results[0][2] == results[1][2] == (8, 24)
    gen = torch.Generator().manual_seed(0)
    x_all, y_all = torch.randn(256, 32, generator=gen), torch.randint(0, 4, (256,),
                                                                        generator=gen)
    torch.manual_seed(1)
    reference = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 4))
    for step in range(4):
        (g0, i0), (g1, i1) = results[0][0][step], results[1][0][step]
        assert (len(i0), len(i1)) == (8, 24)
        idx = torch.cat([i0, i1])
        reference.zero_grad()
        F.cross_entropy(reference(x_all[idx]), y_all[idx]).backward()
        for got in (g0, g1):
            for g, w in zip(got, reference.parameters()):
                torch.testing.assert_close(g, w.grad, rtol=1e-4, atol=1e-5)
    # Busy times from CUDA events (the first steps are discarded), positive and bounded.
    for _, busy, _ in results:
        assert busy and all(0 < rec[3] < 5.0 for rec in busy)
