"""No training step and no sampling step makes the host wait for the GPU, for every registered method.

``HostSyncCounter`` (lightning_gen/host_sync.py) records, on this CPU machine, the operations that
block the host on a GPU: scalar reads of device values, data-dependent shapes and boolean masks,
host-to-device copies of Python values or host tensors, device-to-host reads. Each method trains
two steps through the same builders as `lgen train` (tests/sync_steps.py) and its second step,
forward, backward, optimizer step, EMA/momentum updates, the non-finite guard and the signal check
included, must record none. The only allowed exception is the agreement of ``lightning_gen.control``
(one all-reduce and one read every ``trainer.log_every_n_steps`` batches), checked on its own step;
benchmarks/host_syncs.py prints the counts and the cost of that read.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gen import registry, run
from lightning_gen.host_sync import HostSyncCounter, module_tensors
from tests.sync_steps import TINY, VARIANTS, config, count_training_step


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: a second thread only thrashes
    yield
    torch.set_num_threads(threads)


def test_every_registered_method_has_a_tiny_config():
    assert sorted(TINY) == sorted(registry.entries("method")), "add the new method to tests/sync_steps.TINY"


@pytest.mark.parametrize("name", [*TINY, *VARIANTS])
def test_training_step_makes_no_host_sync(name, tmp_path):
    counter = count_training_step(name, tmp_path)
    assert not counter.events, f"{name}: {counter.report()}"


def test_the_control_agreement_is_the_one_sync_of_its_step(tmp_path):
    # batch 2 ends the interval of log_every_n_steps = 3 batches (capped at the epoch's 3 batches)
    counter = count_training_step("simclr", tmp_path, step=2)
    assert [(e.kind, e.where.split(":")[0]) for e in counter.events] == [("device to host", "control.py")]


def test_the_progress_bar_reads_values_back_only_on_logging_steps(tmp_path):
    """Lightning's bar converts every prog_bar value with .item() when it refreshes (every batch by default)."""
    counter = count_training_step("vae", tmp_path, extra=("trainer.enable_progress_bar=true",))
    assert not counter.events, counter.report()


def sampling_cases():
    return {
        "ddpm/ddpm": ("diffusion", {"sampler": "ddpm"}),
        "ddpm/ddim": ("diffusion", {"sampler": "ddim", "steps": 3, "eta": 1.0, "guidance": 1.0}),
        "ddpm/heun": ("diffusion", {"sampler": "heun", "steps": 3, "guidance": 1.0}),
        "ddpm/dpm++2m": ("diffusion", {"sampler": "dpm++2m", "steps": 3}),
        "flow": ("flow", {"steps": 3, "guidance": 1.0}),
        "dit-ve/heun": ("diffusion_dit", {"sampler": "heun", "steps": 3, "guidance": 1.0}),
        "latent/heun": ("latent_diffusion", {"sampler": "heun", "steps": 3, "guidance": 1.0}),
        "gan": ("gan", {}),
        "vae": ("vae", {}),
        "pixelcnn": ("pixelcnn", {}),
        "token_ar": ("token_ar", {"top_k": 4, "top_p": 0.9, "guidance": 1.0}),
        "distill/progressive": ("distill", {"steps": 2, "guidance": 1.0}),
        "distill/consistency": ("distill_consistency", {"steps": 2, "guidance": 1.0}),
    }


@pytest.mark.parametrize("case", list(sampling_cases()))
def test_sampling_makes_no_host_sync(case, tmp_path):
    """A whole (short) sampling run after a first one: no per-step copies, no reads of device values."""
    name, options = sampling_cases()[case]
    extra = ("method.timesteps=6", "data.image_size=8") if name == "diffusion" else ()
    cfg = config(name, *extra, run_dir=tmp_path)
    if name == "pixelcnn":
        cfg.data.image_size = 4
    method = run.build_method(cfg, run.build_datamodule(cfg)).eval()
    generator = torch.Generator(method.device).manual_seed(0)  # a generator on the sampling device
    method.sample(2, generator=generator, **options)  # the first call copies the schedule to the device
    with HostSyncCounter(module_tensors(method)) as counter:
        method.sample(2, generator=generator, **options)
    assert not counter.events, f"{case}: {counter.report()}"


# ------------------------------------------------------------------ the detector detects


def test_counter_records_each_kind_of_host_sync():
    weight = torch.nn.Parameter(torch.randn(4))
    host = torch.arange(4.0)  # a plain tensor that existed before: a host tensor on a GPU run
    with HostSyncCounter([weight]) as counter:
        x = weight * 2  # on the device, like its input
        x.sum().item()  # scalar read
        bool(x.max() > 0)  # scalar read
        x[x > 0]  # boolean mask (index)
        x.nonzero()  # data-dependent shape
        torch.tensor([1.0, 2.0], device=x.device)  # Python values copied to the device
        host.to(x.device)  # a host tensor copied to the device
        x.tolist()  # device values read back
        x.cpu()  # device values read back
    kinds = [e.kind for e in counter.events]
    assert kinds == [
        "scalar read",
        "scalar read",
        "boolean mask",
        "data-dependent shape",
        "host to device",
        "host to device",
        "device to host",
        "device to host",
    ], counter.report()
    assert all("test_sync_free.py" in e.where for e in counter.events)


def test_counter_leaves_host_values_and_device_factories_alone():
    weight = torch.nn.Parameter(torch.randn(4))
    with HostSyncCounter([weight]) as counter:
        step = torch.tensor(3.0)  # no device: a host tensor, as torch.optim keeps its step counters
        step.item()  # reading host memory costs nothing
        torch.randperm(4).tolist()
        y = weight + torch.full((4,), 2.0, device=weight.device)  # a fill kernel, no copy
        torch.where(y > 0, 1.0, -1.0)  # Python scalars are kernel arguments
        y.to(torch.float64)  # a dtype change stays on the device
    assert not counter.events, counter.report()


def test_raw_counting_sees_what_a_naive_counter_sees(tmp_path):
    """Counted without residency (every scalar read, mask and Python-valued tensor, on host or device),
    Adam's host-side step counters alone give one read per parameter tensor: the count the issue
    reported for today's main (e.g. 22 for the GAN), which the residency-aware count rightly drops."""
    counter = count_training_step("gan", tmp_path, raw=True)
    assert len(counter.events) >= 8, counter.report()


def test_batches_are_pinned_when_training_on_a_cuda_device():
    """The host-to-device copy of each batch overlaps with the GPU only from pinned memory. No CUDA
    trainer can exist on this machine: a stand-in with a CUDA root device asks for the decision only."""
    from types import SimpleNamespace

    cfg = config("simclr")
    datamodule = run.build_datamodule(cfg)
    assert datamodule.cfg.pin_memory is None  # the default follows the accelerator
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert datamodule.pins_memory()
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert not datamodule.pins_memory()
    datamodule.cfg.pin_memory = True  # set explicitly, it is kept
    assert datamodule.pins_memory()
    datamodule.trainer = None
    datamodule.cfg.pin_memory = None
    assert datamodule.eval_dataloader("val").pin_memory is False  # outside a Trainer: nothing to copy to
