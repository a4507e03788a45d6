"""Worker for test_pipeline: one process of a 2-rank gloo group (spawned; importable via sys.path)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from altgrad.dni import Conv1dDNI, LinearBatchNormDNI, LinearDNI
from altgrad.dni.pipeline import DecoupledPipeline, PipelineError

STEPS, SPLIT, CLASSES = 6, 3, 4
HIDDEN = 8
TRANSPORT = "auto"  # set by the spawned entry points: the transport every pipeline of this process uses
STUCK_S, STUCK_TIMEOUT_S = 3.0, 1.0


def stages(seed: int = 0) -> list[nn.Module]:
    """A small net cut in two: ``Linear -> BatchNorm -> ReLU`` and ``Linear -> ReLU -> Linear``."""
    torch.manual_seed(seed)
    first = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU())
    second = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, CLASSES))
    return [first, second]


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(10, 6, generator=g), torch.randint(0, CLASSES, (10,), generator=g)) for _ in range(n)
    ]


def nonzero_init(
    cls: type[nn.Module], inputs: int, outputs: int, seed: int, **params
) -> dict[str, torch.Tensor]:
    """Non-zero synthesizer weights (a fresh one predicts 0), shared by the pipeline and the reference."""
    torch.manual_seed(seed)
    synth = cls(inputs, HIDDEN, outputs, num_layers=1, **params)
    with torch.no_grad():
        synth.final.weight.normal_(0.0, 0.1)
    return synth.state_dict()


def synth_init(seed: int = 1) -> dict[str, torch.Tensor]:
    return nonzero_init(LinearDNI, 12 + CLASSES, 12, seed)


def join(rank: int, tmp: str, world: int = 2, seconds: float = 30.0) -> None:
    """This process as rank ``rank`` of a gloo group (``file://`` rendezvous in ``tmp``), one thread."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/init",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=seconds),
    )
    torch.set_num_threads(1)


def pipeline(
    staleness: int, seed: int = 0, loss_fn=F.cross_entropy, group=None, stage_list=None, **kwargs
) -> DecoupledPipeline:
    pipe = DecoupledPipeline(
        stages(seed) if stage_list is None else stage_list,
        loss_fn,
        "adam",
        lr=1e-2,
        hidden_size=HIDDEN,
        dni_network=LinearDNI,
        dni_params={"num_layers": 1},
        grad_optim="adam",
        grad_lr=1e-2,
        context_size=CLASSES,
        staleness=staleness,
        failure_timeout=2.0,
        group=group,
        **{"transport": TRANSPORT, **kwargs},
    )
    if pipe.interface is not None:
        pipe.interface.synthesizer.load_state_dict(synth_init())
    return pipe


def snapshot(pipe: DecoupledPipeline) -> dict[str, torch.Tensor]:
    out = {f"module.{k}": v.detach().clone() for k, v in pipe.module.state_dict().items()}
    if pipe.interface is not None:
        out.update(
            {f"synth.{k}": v.detach().clone() for k, v in pipe.interface.synthesizer.state_dict().items()}
        )
    if pipe.forward_interface is not None:
        out.update(
            {
                f"fsynth.{k}": v.detach().clone()
                for k, v in pipe.forward_interface.synthesizer.state_dict().items()
            }
        )
    return out


LENGTH = 7  # the conv stages' sequence length


def conv_stages(seed: int = 0) -> list[nn.Module]:
    """A Conv1d net cut after its first convolution: ``(B, C, L)`` feature maps cross the cut."""
    torch.manual_seed(seed)
    first = nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.ReLU())
    second = nn.Sequential(
        nn.Conv1d(5, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * LENGTH, CLASSES)
    )
    return [first, second]


def conv_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    return [
        (torch.randn(10, 3, LENGTH, generator=g), torch.randint(0, CLASSES, (10,), generator=g))
        for _ in range(STEPS)
    ]


def conv_synth_init() -> dict[str, torch.Tensor]:
    """The Conv1dDNI (with batch norm) of the conv cut."""
    return nonzero_init(Conv1dDNI, 5 + CLASSES, 5, 2, kernel_size=3)


def staleness0_steps(
    stage_list, dni_network, dni_params, synth_state, data, **kwargs
) -> list[dict[str, torch.Tensor]]:
    """A pipeline at staleness 0 (flushed after every batch): a snapshot after every step."""
    pipe = DecoupledPipeline(
        stage_list,
        F.cross_entropy,
        "adam",
        lr=1e-2,
        hidden_size=HIDDEN,
        dni_network=dni_network,
        dni_params=dni_params,
        grad_optim="adam",
        grad_lr=1e-2,
        context_size=CLASSES,
        staleness=0,
        failure_timeout=2.0,
        **kwargs,
    )
    if pipe.interface is not None:
        pipe.interface.synthesizer.load_state_dict(synth_state)
    torch.manual_seed(FORWARD_SEED)  # a forward synthesizer is built at stage 1's first step
    steps = []
    for x, y in data:
        pipe.step(x, y)
        pipe.flush()
        steps.append(snapshot(pipe))
    return steps


def conv_run() -> list[dict[str, torch.Tensor]]:
    """The conv net at staleness 0 with a batch-norm convolutional synthesizer."""
    return staleness0_steps(
        conv_stages(), Conv1dDNI, {"num_layers": 1, "kernel_size": 3}, conv_synth_init(), conv_batches()
    )


def collective_between_steps(steps: int = 3) -> list[float]:
    """Messages of 16 MiB (more than a socket's kernel buffer holds) and a collective after every step, as a
    training loop that averages a metric does: a stage that ends its step with its message still queued and blocks
    in the collective must not hold back its peer, which waits for that message inside its step."""
    torch.manual_seed(0)
    width, rows = 4096, 1024
    pipe = DecoupledPipeline(
        [nn.Linear(6, width), nn.Linear(width, CLASSES)],
        F.cross_entropy,
        hidden_size=8,
        dni_params={"num_layers": 1},
        staleness=1,
        failure_timeout=2.0,
        transport=TRANSPORT,
    )
    g = torch.Generator().manual_seed(3)
    totals = []
    for _ in range(steps):
        pipe.step(torch.randn(rows, 6, generator=g), torch.randint(0, CLASSES, (rows,), generator=g))
        total = torch.ones(1)
        dist.all_reduce(total)
        totals.append(float(total))
    pipe.flush()
    return totals


def run(rank: int, tmp: str, transport: str) -> None:
    """Staleness 0 step by step, checkpoint/resume, and the staleness bound (one spawn, every case)."""
    global TRANSPORT
    TRANSPORT = transport
    join(rank, tmp)
    data = batches()
    result: dict[str, object] = {}
    pipe = pipeline(staleness=0)
    steps = []
    for i, (x, y) in enumerate(data):
        pipe.step(x, y)
        if i == SPLIT - 1:
            pipe.save(f"{tmp}/ckpt.pt")
        pipe.flush()  # staleness 0: the target of this batch is trained on before the next forward anyway
        steps.append(snapshot(pipe))
    result["steps"] = steps
    resumed = pipeline(staleness=0, seed=7)  # other initial weights: everything must come from the file
    resumed.load(f"{tmp}/ckpt.pt")
    for x, y in data[SPLIT:]:
        resumed.step(x, y)
        resumed.flush()
    result["resumed"] = snapshot(resumed)
    result["resumed_steps"] = resumed.num_steps
    stale = pipeline(staleness=1)
    applied, stale_steps, sent = [], [], []
    send = stale._send

    def recorded(stage: int, batch: int, tensor: torch.Tensor) -> None:
        sent.append((stage, batch, tensor.detach().clone()))
        send(stage, batch, tensor)

    stale._send = recorded  # type: ignore[method-assign]
    for x, y in data:
        stale.step(x, y)
        applied.append(stale.targets_applied)
        stale_steps.append(snapshot(stale))
    stale.flush()
    applied.append(stale.targets_applied)
    stale_steps.append(snapshot(stale))
    result["applied"] = applied
    result["transports"] = [pipe.transports, resumed.transports, stale.transports]
    stale.close()
    try:
        stale.step(*data[0])
    except RuntimeError as exc:
        result["closed"] = str(exc)
    result["stale_steps"] = stale_steps
    result["sent"] = sent
    result["collective_between_steps"] = collective_between_steps()
    result["conv_steps"] = conv_run()
    if rank == 0:  # a feature-last synthesizer on a conv stage: refused at construction (no message is sent)
        try:
            DecoupledPipeline(conv_stages(), F.cross_entropy, dni_network=LinearDNI, context_size=CLASSES)
        except ValueError as exc:
            result["conv_refused"] = str(exc)
    torch.save(result, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


UNLOCK_STEPS = 40  # forward unlocking: batches per run
FORWARD_SEED = 3  # the global seed right before stage 1 builds its forward synthesizer (at its first step)


def unlocked_run(tmp: str, name: str, rank: int, delay: bool) -> dict[str, object]:
    """Forward unlocking at staleness 1 over UNLOCK_STEPS batches, saved after batch SPLIT - 1.

    ``delay`` makes the ranks sleep at a few batches (each one in turn), so that messages arrive at other
    points of the other rank's work: the result must not depend on it.
    """
    pipe = pipeline(staleness=1, synthetic_inputs=True)
    applied, losses = [], []
    for i, (x, y) in enumerate(batches(UNLOCK_STEPS)):
        if delay and i % 7 == rank * 3:
            time.sleep(0.01)
        pipe.step(x, y)
        if i == SPLIT - 1:
            pipe.save(f"{tmp}/{name}.pt")
        applied.append(pipe.inputs_applied)
        if pipe.forward_interface is not None and pipe.forward_interface.last_loss is not None:
            losses.append(float(pipe.forward_interface.last_loss))
    pipe.flush()
    return {"final": snapshot(pipe), "applied": applied, "losses": losses, "applied_end": pipe.inputs_applied}


def tied_stages() -> list[nn.Module]:
    """Stage 1 reuses stage 0's Linear (a block registered in two stages: its weight is shared)."""
    first, second = stages()
    return [first, nn.Sequential(first[0], nn.ReLU(), second[2])]


def bad_arguments(rank: int) -> dict[str, tuple[str, str] | None]:
    """What each bad construction raised on this rank (``None``: nothing)."""
    from altgrad.dni import Conv2dDNI

    def stages_conv(seed: int = 0) -> list[nn.Module]:
        first, _ = stages(seed)
        return [first, nn.Sequential(nn.Flatten(), nn.Linear(12, CLASSES))]

    cases = {
        "stage0": lambda: pipeline(0, synthetic_inputs=[0, 1]),
        "outside": lambda: pipeline(0, synthetic_inputs=[1, 2]),
        "type": lambda: pipeline(0, synthetic_inputs="all"),
        "conv_synth": lambda: DecoupledPipeline(
            stages(), F.cross_entropy, synthetic_inputs=True, dni_network=Conv2dDNI
        ),
        "tied": lambda: DecoupledPipeline(tied_stages(), F.cross_entropy),
        "no_width": lambda: DecoupledPipeline(stages_conv(), F.cross_entropy, synthetic_inputs=True),
    }
    out: dict[str, tuple[str, str] | None] = {}
    for case, build in cases.items():  # the last case fails on rank 1 only: rank 0 stops, naming it
        try:
            build()
            out[case] = None
        except (TypeError, ValueError, PipelineError) as exc:
            out[case] = (type(exc).__name__, str(exc))
    return out


def bn_synth_init() -> dict[str, torch.Tensor]:
    """A LinearBatchNormDNI synthetic-gradient model (batch norm in the synthesizer)."""
    return nonzero_init(LinearBatchNormDNI, 12 + CLASSES, 12, 4)


def bn_unlocked_run() -> list[dict[str, torch.Tensor]]:
    """Forward unlocking at staleness 0 with batch-norm synthesizers (both kinds)."""
    return staleness0_steps(
        stages(), LinearBatchNormDNI, {"num_layers": 1}, bn_synth_init(), batches(), synthetic_inputs=True
    )


def unlocked(rank: int, tmp: str) -> None:
    """Forward unlocking: two runs (one with delays), a resumed run, bad arguments (one spawn)."""
    join(rank, tmp)
    s0 = pipeline(staleness=0, synthetic_inputs=True)
    torch.manual_seed(FORWARD_SEED)
    steps = []
    for x, y in batches():
        s0.step(x, y)
        s0.flush()  # staleness 0: the targets of this batch are trained on before the next forward anyway
        steps.append(snapshot(s0))
    result: dict[str, object] = {
        "steps": steps,
        "plain": unlocked_run(tmp, "plain", rank, delay=False),
        "delayed": unlocked_run(tmp, "delayed", rank, delay=True),
    }
    resumed = pipeline(
        staleness=1, seed=7, synthetic_inputs=True
    )  # other weights: all must come from the file
    resumed.load(f"{tmp}/plain.pt")
    for x, y in batches(UNLOCK_STEPS)[SPLIT:]:
        resumed.step(x, y)
    resumed.flush()
    result["resumed"] = snapshot(resumed)
    result["resumed_applied"] = resumed.inputs_applied
    result["saved_keys"] = sorted(torch.load(f"{tmp}/plain.pt", weights_only=True)["stages"][rank])
    dist.barrier()
    result["bn_steps"] = bn_unlocked_run()
    result["bad"] = bad_arguments(rank)
    torch.save(result, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


CASES = ("raise1", "raise0", "tuple0", "first0", "stuck1", "kill1")  # the killed one last: it ends rank 1


def fail_case(rank: int, tmp: str, case: str, group: dist.ProcessGroup) -> dict[str, object]:
    """Stage 1 (``raise1``, ``kill1``) or 0 (``raise0``; ``tuple0``: returns a tuple) fails at batch 3, or stage 0
    at batch 0, before its first message (``first0``); return what this rank raised, when."""
    failing = 0 if case in ("raise0", "tuple0", "first0") else 1
    at = 0 if case == "first0" else 3
    state = {"batch": 0}

    def loss_fn(out, y):
        if rank == failing and state["batch"] == 3:
            if case == "kill1":
                os.kill(os.getpid(), signal.SIGKILL)
            if case == "stuck1":  # alive, but silent for longer than its neighbour's timeout
                time.sleep(STUCK_S)
                return F.cross_entropy(out, y)
            raise RuntimeError("boom in the loss")
        return F.cross_entropy(out, y)

    pipe = pipeline(staleness=1, loss_fn=loss_fn, group=group)
    if case == "stuck1":  # the store's timeout, shortened (the process group's own calls keep theirs)
        for link in pipe._links.values():
            link.timeout = STUCK_TIMEOUT_S
    if case in ("raise0", "tuple0", "first0") and rank == 0:
        forward = pipe.module.forward

        def broken(x):
            if state["batch"] == at:
                if case == "tuple0":  # what an nn.LSTM returns
                    out = forward(x)
                    return out, (out, out)
                raise ValueError("boom in stage 0")
            return forward(x)

        pipe.module.forward = broken  # type: ignore[method-assign]
    outcome: dict[str, object] = {"error": None}
    start = time.monotonic()
    try:
        for x, y in batches(8):
            pipe.step(x, y)
            state["batch"] += 1
            start = time.monotonic()
        pipe.flush()
    except Exception as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc), "notes": getattr(exc, "__notes__", [])}
    outcome["seconds"] = time.monotonic() - start
    return outcome


def fail(rank: int, tmp: str, transport: str) -> None:
    """Every failure case on its own process group of the same two processes; outcomes go to rank<r>.json."""
    global TRANSPORT
    TRANSPORT = transport
    join(rank, tmp, seconds=60.0)
    groups = {case: dist.new_group([0, 1]) for case in CASES}
    outcomes = {}
    for case in CASES:
        outcomes[case] = fail_case(rank, tmp, case, groups[case])
        with open(f"{tmp}/rank{rank}.json", "w") as fh:
            json.dump(outcomes, fh)
    os._exit(0)  # the groups are broken on purpose (a peer was killed): no teardown


def three_stages(seed: int = 0) -> list[nn.Module]:
    """A small net cut in three: a middle stage has a neighbour on each side and its own synthesizer."""
    first, second = stages(seed)
    return [first, second[:2], second[2:]]


def three(rank: int, tmp: str, transport: str) -> None:
    """Three ranks at staleness 0: a snapshot of this rank's stage after every step (rank<r>.pt)."""
    global TRANSPORT
    TRANSPORT = transport
    join(rank, tmp, world=3)
    pipe = pipeline(0, stage_list=three_stages())
    if pipe.interface is not None:
        pipe.interface.synthesizer.load_state_dict(synth_init(1 + rank))
    steps = []
    for x, y in batches():
        pipe.step(x, y)
        pipe.flush()
        steps.append(snapshot(pipe))
    torch.save({"steps": steps, "transports": pipe.transports}, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    pipe.close()
    dist.destroy_process_group()
