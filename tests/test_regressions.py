"""Named regression tests: one per divergence from torch that the contract issue (#13) listed, and
the sizes the benchmarks use. Each compares with torch: the same values, or the same exception
type (fastnorm's may be a subclass, so that code catching torch's still catches it)."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from conftest import BN_BACKENDS, OPTIM_BACKENDS, assert_close

import fastnorm
from fastnorm import _arrays


def _outcome(fn):
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - compared below
        return exc


def _same_outcome(ours, theirs):
    assert (ours is None) == (theirs is None) and (theirs is None or isinstance(ours, type(theirs))), (
        f"torch: {theirs!r}, fastnorm: {ours!r}"
    )


def _twins(name, backend, shapes=((5, 3), (4,)), dtype=torch.float64, **options):
    torch.manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    return (theirs, getattr(torch.optim, name)(theirs, **options)), (
        ours,
        getattr(fastnorm.optim, name)(ours, backend=backend, **options),
    )


def _step_both(twins, grads=None):
    outcomes = []
    for params, opt in twins:
        for i, p in enumerate(params):
            p.grad = (grads[i] if grads else torch.ones_like(p) * (i + 1)).clone()
        outcomes.append(_outcome(opt.step))
    _same_outcome(outcomes[1], outcomes[0])
    return outcomes[0]


def _same_params_and_state(twins):
    (theirs, topt), (ours, oopt) = twins
    for a, b in zip(theirs, ours):
        assert_close(b, a, 1e-12, 1e-14, "parameter")
    a, b = topt.state_dict(), oopt.state_dict()
    assert sorted(a["state"]) == sorted(b["state"])
    for i, state in a["state"].items():
        assert sorted(state) == sorted(b["state"][i])
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.device == b["state"][i][key].device
                assert_close(b["state"][i][key], value, 1e-12, 1e-14, key)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_parameter_data_of_another_size_raises_like_torch(backend):
    """Was: heap corruption (free(): invalid next size) on numba."""
    twins = _twins("Adam", backend)
    _step_both(twins)
    for params, _ in twins:
        params[0].data = torch.randn(params[0].numel() + 3, dtype=torch.float64)
    outcome = _step_both(twins, grads=[torch.ones(18, dtype=torch.float64), torch.ones(4, dtype=torch.float64)])
    assert isinstance(outcome, RuntimeError)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_model_to_another_dtype_after_a_step(backend):
    """Was: a segfault on numba after model.double() (state stays float32, as torch's)."""
    twins = _twins("Adam", backend, dtype=torch.float32)
    _step_both(twins)
    for params, _ in twins:
        for p in params:
            p.data = p.data.double()
    outcome = _step_both(twins, grads=[torch.ones(5, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)])
    if not isinstance(outcome, BaseException):  # torch stepped: so did fastnorm, to the same values
        _same_params_and_state(twins)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_sgd_momentum_zero_keeps_no_state_then_turned_on_mid_run(backend):
    """Was: state_dict()["state"] == {0: {}} with momentum 0 where torch's is {}; and KeyError on
    numba when momentum went 0 -> 0.9, where torch creates momentum_buffer and trains on."""
    twins = _twins("SGD", backend, lr=0.1)
    _step_both(twins)
    assert twins[1][1].state_dict()["state"] == twins[0][1].state_dict()["state"] == {}
    for _, opt in twins:
        opt.param_groups[0]["momentum"] = 0.9
    _step_both(twins)
    _step_both(twins)
    _same_params_and_state(twins)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_rmsprop_centered_turned_on_raises_like_torch(backend):
    """Was: silently computed with aliased buffers; torch raises (no grad_avg in the state)."""
    twins = _twins("RMSprop", backend, lr=0.01)
    _step_both(twins)
    for _, opt in twins:
        opt.param_groups[0]["centered"] = True
    assert isinstance(_step_both(twins), KeyError)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_optimizer_copies_keep_their_backend_and_step(backend, how):
    """Was: AttributeError (backend lost by torch's __getstate__)."""
    twins = list(_twins("Adam", backend, lr=0.01))
    _step_both(twins)
    copies = []
    for _, opt in twins:
        if how == "deepcopy":
            new = copy.deepcopy(opt)
        else:
            buffer = io.BytesIO()
            torch.save(opt, buffer)
            buffer.seek(0)
            new = torch.load(buffer, weights_only=False)
        copies.append(([p for g in new.param_groups for p in g["params"]], new))
    assert copies[1][1].backend == backend
    _step_both(copies)
    _same_params_and_state(copies)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_auto_hands_sparse_gradients_to_torch(name):
    """Was: "does not support sparse gradients" under auto; torch's Adagrad exists for this case."""
    torch.manual_seed(0)
    theirs = torch.nn.Embedding(10, 3, sparse=True, dtype=torch.float64)
    ours = copy.deepcopy(theirs)
    opts = [getattr(torch.optim, name)(theirs.parameters(), lr=0.1),
            getattr(fastnorm.optim, name)(ours.parameters(), lr=0.1)]  # fmt: skip
    index = torch.tensor([1, 4, 4, 9])
    for module, opt in zip((theirs, ours), opts):
        module(index).sum().backward()
        opt.step()
    assert_close(ours.weight, theirs.weight, 1e-12, 1e-14, "embedding")
    with pytest.raises(RuntimeError, match="sparse"):
        fastnorm.optim.SGD(ours.parameters(), lr=0.1, backend="numba").step()


def test_auto_hands_complex_parameters_to_torch():
    torch.manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(4, dtype=torch.complex128))]
    ours = [torch.nn.Parameter(theirs[0].detach().clone())]
    twins = ((theirs, torch.optim.Adam(theirs, lr=0.1)), (ours, fastnorm.optim.Adam(ours, lr=0.1)))
    _step_both(twins, grads=[torch.full((4,), 1 + 2j, dtype=torch.complex128)])
    assert_close(ours[0], theirs[0], 1e-12, 1e-14, "complex parameter")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_batchnorm_weight_changed_before_backward_raises_like_torch(backend):
    """Was: the backward silently used the new weight (reference, numba)."""
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    for bn in (torch.nn.BatchNorm1d(3, dtype=torch.float64), fastnorm.nn.BatchNorm1d(3, backend=backend,
                                                                                     dtype=torch.float64)):  # fmt: skip
        y = bn(x)
        with torch.no_grad():
            bn.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_failed_batchnorm_call_changes_nothing(backend):
    """Was: num_batches_tracked counted a call that then failed validation (torch counts it too;
    fastnorm promises better)."""
    bn = fastnorm.nn.BatchNorm2d(3, backend=backend)
    bn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad in (torch.randn(1, 3, 1, 1), torch.randn(4, 5, 2, 2), torch.ones(4, 3, 2, 2, dtype=torch.int64)):
        with pytest.raises((ValueError, RuntimeError, TypeError, NotImplementedError)):
            bn(bad)
        for key, value in bn.state_dict().items():
            assert torch.equal(value, before[key]), f"a failed call changed {key}"


def test_buffer_pool_hands_each_block_to_one_owner_across_threads():
    """Was: "free" decided by sys.getrefcount without a lock."""
    pool = _arrays.BufferPool(min_bytes=1 << 10, max_bytes=64 << 20)
    seen, lock, errors = [], threading.Lock(), []

    def work():
        try:
            for _ in range(200):
                a = pool.empty((512,), "float64")
                a[:] = threading.get_ident()
                with lock:
                    seen.append(a.ctypes.data)
                assert (a == threading.get_ident()).all(), "another thread wrote into this block"
        except AssertionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.in_use() == 0


# -- the sizes the benchmarks use ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_batchnorm_at_benchmark_sizes(fmt):
    """(8, 64, 72, 72): several channel blocks of the numba kernels; channels-last at that size."""
    torch.manual_seed(0)
    x = (torch.randn(8, 64, 72, 72) * 2 + 1).to(memory_format=fmt).requires_grad_(True)
    ref = torch.nn.BatchNorm2d(64)
    ours = fastnorm.nn.BatchNorm2d(64, backend="numba")
    dy = torch.randn_like(x)
    outs = []
    for bn in (ref, ours):
        xi = x.detach().clone().requires_grad_(True)
        y = bn(xi)
        y.backward(dy)
        outs.append((y, xi.grad, bn.weight.grad, bn.running_var))
    for a, e, what in zip(outs[1], outs[0], ["y", "dx", "dweight", "running_var"]):
        assert_close(a, e, 1e-4, 1e-4 * (50 if what == "dweight" else 1), what)


@pytest.mark.parametrize("backend", OPTIM_BACKENDS)
def test_optimizer_tensors_of_many_chunks_with_uneven_tails(backend):
    """100003 and 65537 values: many chunks of the kernels' tables, tails of one element."""
    twins = _twins("Adam", backend, shapes=((100003,), (65537,)), lr=0.01, amsgrad=True)
    for _ in range(3):
        _step_both(twins, grads=[torch.randn(100003, dtype=torch.float64), torch.randn(65537, dtype=torch.float64)])
    _same_params_and_state(twins)


def test_two_threads_running_batchnorm_equal_a_sequential_run():
    torch.manual_seed(0)
    inputs = [torch.randn(16, 8, 12, 12, dtype=torch.float64) for _ in range(2)]
    expected = [fastnorm.functional.batch_norm(x, None, None, training=True, backend="numba") for x in inputs]
    results = [None, None]

    def run(i):
        for _ in range(20):
            results[i] = fastnorm.functional.batch_norm(inputs[i], None, None, training=True, backend="numba")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_strided_per_channel_tensors_give_torchs_values(training):
    """The numba backend reads (C,) vectors on raw addresses: a strided weight, bias or running
    statistic must be read (and the running statistics written back) as torch does, not
    refused or misread."""
    c = 5
    ours, theirs = fastnorm.nn.BatchNorm1d(c, backend="numba").double(), torch.nn.BatchNorm1d(c).double()
    for m in (ours, theirs):
        base = torch.arange(4.0 * c, dtype=torch.float64).view(c, 4)
        m.weight = torch.nn.Parameter(base[:, 1] / 10)  # stride 4
        m.bias = torch.nn.Parameter(base[:, 2] / 10)
        m.running_mean = base[:, 0].clone().unsqueeze(1).expand(c, 2)[:, 0]  # stride 2 view of a copy
        m.running_var = (base[:, 3] / 20 + 1).clone().unsqueeze(1).expand(c, 2)[:, 1]
        m.train(training)
    x = torch.randn(7, c, dtype=torch.float64, requires_grad=True)
    ya, yb = ours(x), theirs(x)
    assert ya.grad_fn.name() == "fastnorm::BatchNormBackward"  # the op ran
    dy = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, (x, ours.weight, ours.bias), dy)
    gb = torch.autograd.grad(yb, (x, theirs.weight, theirs.bias), dy)
    assert_close(ya, yb, 1e-10, 1e-12, "output")
    for a, b, what in zip(ga, gb, ("dx", "dweight", "dbias")):
        assert_close(a, b, 1e-10, 1e-12, what)
    assert_close(ours.running_mean, theirs.running_mean, 1e-12, 1e-14, "running_mean")
    assert_close(ours.running_var, theirs.running_var, 1e-12, 1e-14, "running_var")


def test_a_group_torch_steps_raises_before_a_later_group_fails_its_checks():
    """Was: fastnorm checked every group before running any, so a later group's KeyError (momentum
    switched on mid-run, no momentum buffer) came before the error torch's own step raises for an
    earlier group (float64 state of parameters moved to float32: RMSprop's lerp refuses). Found by
    the optimizer machine in a long randomised run. The failed step still changes nothing."""

    def first_error(module, **backend):
        torch.manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(7, dtype=torch.float64)) for _ in range(3))
        opt = module.RMSprop([c], lr=0.01)  # served by fastnorm's kernels (float64 throughout)
        opt.add_param_group({"params": [a], "momentum": 0.9, "centered": True})
        opt.add_param_group({"params": [b], "momentum": 0.0})  # no momentum buffer
        for p in (a, b, c):
            p.grad = torch.randn(7, dtype=torch.float64)
        opt.step()
        for p in (a, b):  # model.to(torch.float32), in part: the state stays float64
            p.data, p.grad = p.data.float(), p.grad.float()
        opt.param_groups[2]["momentum"] = 0.9
        before = copy.deepcopy(([a, b, c], opt.state_dict()))
        with pytest.raises(Exception) as error:
            opt.step()
        return error.value, before, ([a, b, c], opt.state_dict())

    theirs, _, _ = first_error(torch.optim)
    assert isinstance(theirs, RuntimeError)
    for backend in ("reference", "numba"):
        ours, before, after = first_error(fastnorm.optim, backend=backend)
        assert type(ours) is type(theirs), f"{backend}: {ours!r}, torch: {theirs!r}"
        for p, q in zip(before[0], after[0]):
            assert torch.equal(p, q), f"{backend}: the failed step changed a parameter"
        for index, state in before[1]["state"].items():
            for key, value in state.items():
                assert torch.equal(after[1]["state"][index][key], value), f"{backend}: the failed step changed {key}"


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_an_in_place_change_of_a_strided_input_raises_torchs_error(monkeypatch, backend):
    """Was: a strided input was copied to a dense one inside the autograd Function, which saved
    the copy only, so changing the input in place before the backward went unnoticed (torch's
    BatchNorm raises), and second derivatives, which differentiate the saved tensor, did not reach
    the input (tests/test_batchnorm_parity.py, test_gradgradcheck_float64). Found in review of the
    C++ node, which made the same copy; the copy is now made where autograd records it, and the
    input is saved as well."""
    errors = []
    for module in (torch.nn.BatchNorm2d(3), fastnorm.nn.BatchNorm2d(3, backend=backend)):
        x = torch.randn(3, 3, 4, 3)[:, :, ::2].mT.requires_grad_(True)  # neither layout: copied
        y = module(x)
        with torch.no_grad():
            x.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as error:
            y.backward(torch.ones_like(y))
        errors.append(type(error.value))
    assert errors[0] is errors[1]


@pytest.mark.parametrize("grad_layout", ["same", "contiguous"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_channels_last_parameters_are_updated_in_their_layout(name, grad_layout):
    """Was: a channels-last model's conv weights (and their gradients and state, which take their
    layout) were copied to contiguous memory and back at every step: ResNet-18 channels-last
    trained 30% slower with fastnorm's Adam than with torch's (bench/test_bench_e2e.py). The op
    updates any one dense layout in place; a gradient of another layout is staged, as before."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(8, 3, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last))
            for _ in range(2)]  # fmt: skip
    theirs = [torch.nn.Parameter(p.detach().clone(memory_format=torch.channels_last)) for p in ours]
    options = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    opt = getattr(fastnorm.optim, name)(ours, backend="numba", **options)
    ref = getattr(torch.optim, name)(theirs, **options)
    addresses = [p.data_ptr() for p in ours]
    for _ in range(3):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, dtype=torch.float64)
            p.grad = g.to(memory_format=torch.channels_last) if grad_layout == "same" else g
            q.grad = g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert_close(p, q, 1e-12, 1e-12, "parameter")
        assert p.is_contiguous(memory_format=torch.channels_last)
    assert [p.data_ptr() for p in ours] == addresses
