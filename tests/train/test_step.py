"""train_step on a TrainState built by hand (no Trainer): it is the textbook step, number for number."""

import torch

from flowtrain.data.loader import Batch
from flowtrain.flow import FlowConfig, FlowMonitor
from flowtrain.flow.guard import Guard, GuardConfig
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.model.loss import lm_loss
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.config import ClipConfig
from flowtrain.train.distributed import DataParallel, DistContext
from flowtrain.train.runtime import Precision
from flowtrain.train.step import TrainState, train_step

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=17, embd_dropout=0.1)


class _Slots:
    """Two micro-batches a step from a seeded generator: the loader part of the state."""

    def __init__(self):
        self.data = torch.Generator().manual_seed(1)

    def next_step(self):
        batches = []
        for _ in range(2):
            idx = torch.randint(0, 17, (3, 9), generator=self.data)
            batches.append(Batch(inputs=idx[:, :-1], targets=idx[:, 1:], doc_ids=None, n_targets=idx[:, 1:].numel()))
        return batches


def _model_and_optimizer():
    torch.manual_seed(0)
    model = GPT(CFG)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _state(model, opt, **extra) -> TrainState:
    """A one-process CPU state around `model` and `opt`: the slots above, a norm clip at 0.5, the guard."""
    return TrainState(
        model=model,
        raw_model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
        loader=_Slots(),
        clipper=GradClipper(ClipConfig(kind="norm", max_norm=0.5)),
        guard=Guard(GuardConfig(), list(model.named_parameters()), host_every_step=True),
        precision=Precision(None, "cpu"),
        parallel=DataParallel(DistContext("none"), torch.device("cpu")),
        device=torch.device("cpu"),
        **extra,
    )


def test_the_step_is_the_textbook_loop_on_a_small_explicit_state():
    model, opt = _model_and_optimizer()
    state = _state(model, opt)
    state.monitor = FlowMonitor(model, opt, FlowConfig(interval=1))
    losses = []
    for _ in range(3):
        out = train_step(state)
        losses.append(out.loss)
        assert out.verdict.action == "proceed" and out.tokens == 2 * 3 * 8
    assert state.step == 3 and state.monitor.collect(3) is not None
    rng_after = torch.get_rng_state()

    # the same three steps written out by hand
    model, opt = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    clipper, slots = GradClipper(ClipConfig(kind="norm", max_norm=0.5)), _Slots()
    params = [(n, p) for n, p in model.named_parameters()]
    for step in range(3):
        batches, total = slots.next_step(), 0.0
        for batch in batches:
            loss = lm_loss(model(batch.inputs), batch.targets).loss
            weight = batch.n_targets / (2 * 3 * 8)
            (loss * (weight * 1)).backward()
            total += loss.detach() * weight
        clipper(params)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(total, losses[step]), step
    assert all(torch.equal(a, b) for a, b in zip(state.raw_model.state_dict().values(), model.state_dict().values()))
    assert torch.equal(rng_after, torch.get_rng_state())


def test_one_process_data_parallel_is_the_trivial_case():
    parallel = DataParallel(DistContext("none"), torch.device("cpu"), padded_rows=True)
    loss = torch.tensor(1.5)
    assert parallel.world_size == 1 and parallel.is_main and not parallel.enabled
    assert parallel.global_targets(37) == 37 and parallel.global_loss(loss) is loss
    verdict = object()
    assert parallel.agree(verdict, guard=None, host_now=True) is verdict
    assert parallel.broadcast_json({"name": "x"}) == {"name": "x"}
    with parallel.grad_sync(torch.nn.Linear(2, 2), last=False), parallel.main_first():
        parallel.barrier()
    parallel.shutdown()


def test_a_compiled_model_runs_one_graph_between_monitored_steps_and_eagerly_on_them():
    """Dynamo does not guard on module hooks: compiled once without the microscope's hooks a graph never calls
    them, compiled with them it breaks at each on every step. So monitored steps run the eager module (hooks
    called, statistics taken) and the others one compiled graph; training is the eager run's."""
    graphs = []

    def counting(gm, example_inputs):  # a backend that runs dynamo's graph as it is and counts its calls
        def run(*args):
            graphs.append(1)
            return gm.forward(*args)

        return run

    def six_steps(compiled: bool):
        model, opt = _model_and_optimizer()  # seeds the global RNG (dropout) the same way for both runs
        state = (
            _state(torch.compile(model, backend=counting), opt, eager_model=model) if compiled else _state(model, opt)
        )
        state.monitor = FlowMonitor(model, opt, FlowConfig(interval=2))  # steps 1, 3, 5 monitored
        records, calls = [], []
        for step in range(1, 7):
            before = len(graphs)
            train_step(state)
            records.append(state.monitor.collect(step))
            calls.append(len(graphs) - before)
        return model, records, calls

    torch._dynamo.reset()
    model, records, calls = six_steps(compiled=True)
    reference, expected, _ = six_steps(compiled=False)
    assert calls == [0, 2, 0, 2, 0, 2]  # two micro-batches: one graph each between monitored steps, none on them
    for record, want in zip(records[::2], expected[::2], strict=True):
        depth = record.depth("resid_grad_norm")
        assert all(v > 0 for v in depth) and depth == want.depth("resid_grad_norm")
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
