"""Issue 25: the decoupled pipeline over torch.distributed (2 gloo ranks, spawned with a file:// init method).

One spawn checks the semantics: staleness 0 equals the single-process wrapper step by step, a checkpoint of all
stages resumes exactly, and staleness 1 trains each synthesizer on exactly the targets it promises. Three more
spawns check failures: an exception on either stage, or a killed process, stops every rank with an error
naming the failing stage, within the stated timeout.
"""

import json
import sys

import _pipeline_worker as w
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from altgrad.dni import DNI, LinearDNI
from altgrad.dni._optim import optimizer_factory
from altgrad.dni.pipeline import split_sequential

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo"
)

#: Every rank must have stopped this long after the failure (the failing stage waits at most
#: failure_timeout = 2 s per neighbour for it to take the failure header; gloo reports a closed connection at
#: once); generous for a loaded 2-core machine.
STOP_WITHIN_S = 10.0
JOIN_S = 60.0  # process start-up (importing torch twice) included


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    mp.spawn(w.run, args=(str(tmp),), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference_steps() -> list[dict[str, torch.Tensor]]:
    """The single-process wrapper on the same net, data and synthesizer: one snapshot per step."""
    net = nn.Sequential(*w.stages(0))
    dni = DNI(
        net,
        modules=["0"],
        hidden_size=w.HIDDEN,
        dni_network=LinearDNI,
        dni_params={"num_layers": 1},
        optim="adam",
        lr=1e-2,
        grad_optim="adam",
        grad_lr=1e-2,
        context_size=w.CLASSES,
    )
    dni.interface("0").synthesizer.load_state_dict(w.synth_init())
    factory = optimizer_factory("adam", 1e-2, "optim")
    assert factory is not None
    head = factory(net[1].parameters())
    out = []
    for x, y in w.batches():
        head.zero_grad(set_to_none=True)
        F.cross_entropy(dni(x, context=y), y).backward()
        head.step()
        dni.step_synthesizers()  # what the pipeline's flush() does at staleness 0
        snap = [{f"module.{k}": v.clone() for k, v in net[i].state_dict().items()} for i in range(2)]
        snap[0].update(
            {f"synth.{k}": v.clone() for k, v in dni.interface("0").synthesizer.state_dict().items()}
        )
        out.append(snap)
    return out


def test_staleness_0_matches_the_single_process_wrapper_step_by_step(ranks):
    ref = reference_steps()
    for step in range(w.STEPS):
        for rank in range(2):
            got = ranks[rank]["steps"][step]
            assert set(got) == set(ref[step][rank])
            for key, value in got.items():
                # Same operations on the same values (the message passing copies bits); a bound anyway, for any
                # reordering of float32 sums between the two schedules: 6 Adam steps of lr 1e-2 move a weight by
                # at most 0.06, rounding of the update adds ~1e-7 per step.
                torch.testing.assert_close(
                    value, ref[step][rank][key], rtol=1e-5, atol=1e-6, msg=f"{key}@{step}"
                )


def test_checkpoint_of_all_stages_resumes_exactly(ranks):
    for rank in range(2):
        assert ranks[rank]["resumed_steps"] == w.STEPS
        final = ranks[rank]["steps"][-1]
        for key, value in ranks[rank]["resumed"].items():
            # exact: same route, state restored from the checkpoint
            assert torch.equal(value, final[key]), key


def test_staleness_1_trains_each_synthesizer_on_the_promised_targets(ranks):
    # At the forward of batch t, stage 0's synthesizer has seen the targets of batches <= t - 2; flush() adds
    # the rest. The last stage has no synthesizer.
    assert ranks[0]["applied"] == [0, 0, 1, 2, 3, 4, 6]
    assert ranks[1]["applied"] == [0] * 7


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """One spawn, three cases (each on its own process group): what every rank raised, and the exit codes."""
    tmp = tmp_path_factory.mktemp("failures")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=w.fail, args=(r, str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not stop"
    out = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return out, [p.exitcode for p in procs]


@pytest.mark.parametrize(
    ("case", "failing", "text"), [("raise1", 1, "boom in the loss"), ("raise0", 0, "boom in stage 0")]
)
def test_an_exception_on_one_stage_stops_every_rank_naming_it(failures, case, failing, text):
    out = [failures[0][r][case] for r in range(2)]
    own = out[failing]
    assert own["error"] in ("RuntimeError", "ValueError")
    assert text in own["message"]
    if sys.version_info >= (3, 11):
        assert own["notes"] == [f"raised in altgrad.dni pipeline stage {failing} of 2"]
    other = out[1 - failing]
    assert other["error"] == "PipelineError"
    assert f"stage {failing} raised" in other["message"]
    assert text in other["message"]
    for r in range(2):
        assert out[r]["seconds"] < STOP_WITHIN_S


def test_a_killed_stage_stops_every_rank_naming_it(failures):
    out, codes = failures
    assert "kill1" not in out[1]  # killed before writing anything
    assert codes == [0, -9]
    assert out[0]["kill1"]["error"] == "PipelineError"
    assert "stage 1 stopped" in out[0]["kill1"]["message"]
    assert out[0]["kill1"]["seconds"] < STOP_WITHIN_S


def test_split_sequential_and_bad_arguments():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 1))
    parts = split_sequential(model, [2, 3])
    assert [len(p) for p in parts] == [2, 1, 1]
    assert parts[1][0] is model[2]
    with pytest.raises(ValueError, match="strictly increasing"):
        split_sequential(model, [3, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        split_sequential(model, [0])
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        split_sequential(nn.Linear(2, 2), [1])
