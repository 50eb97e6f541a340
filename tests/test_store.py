"""The parameter store, driven directly: every mode, membership, retries, errors."""

import ast
import dataclasses
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ps_server
from protos import ps_pb2
from protos.optimizers import Adam
from ps_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ps_server.flat import GroupState
from ps_server.store import ParameterStore, StoreState, Waiter
from tests.storekit import chunks_for, grads, initial_values, make_job, new_store, push, weights


def assert_weights(store, shift):
    """Every weight equals its initial value minus ``shift`` (SGD, lr 1)."""
    for name, value in initial_values().items():
        torch.testing.assert_close(weights(store)[name], value - shift, rtol=0, atol=1e-6)


# ------------------------------------------------------------------- async


def test_async_applies_every_push_at_once():
    store, job = new_store("async")
    for clock in range(1, 4):
        result = push(store, job, "a", clock, 1.0)
        assert result.applied and result.version == clock
    push(store, job, "b", 1, 2.0)
    assert_weights(store, 5.0)
    assert store.view().counters.updates_applied == 4


def test_init_splits_tensors_into_parts():
    store, job = new_store()
    assert len([p for p in job.layout.parts_on(0) if p.tensor == "big"]) == 4
    _, _, pieces = store.pull("job", "x", observe=True)
    assert [p.values.size for p in pieces if p.tensor == "big"] == [12, 12, 12, 4]
    for name, value in initial_values().items():
        torch.testing.assert_close(weights(store)[name], value)


def test_retried_push_is_acknowledged_not_applied():
    store, job = new_store("async")
    assert push(store, job, "a", 1, 1.0).applied
    retry = push(store, job, "a", 1, 1.0, pulled=0)
    assert retry.duplicate and not retry.applied
    assert store.view().counters.duplicates == 1 and store.version == 1
    assert_weights(store, 1.0)


def test_staleness_aware_lr_and_histogram():
    store, job = new_store("async", staleness_aware_lr=True, lr=1.0)
    for clock in (1, 2, 3):
        push(store, job, "fast", clock, 1.0)
    result = push(store, job, "slow", 1, 3.0, pulled=0)  # three versions behind
    assert result.staleness == 3 and math.isclose(result.lr, 1 / 3)
    assert_weights(store, 4.0)  # 3 * 1.0 + 3.0 / 3
    assert store.view().counters.staleness == {0: 3, 3: 1}


# -------------------------------------------------------------------- sync


def test_sync_applies_the_mean_once_per_step():
    store, job = new_store("sync", workers=["a", "b", "c"])
    assert not store.pull_decision("job", "a", 0, 1).ready
    push(store, job, "a", 1, 1.0)
    push(store, job, "b", 1, 2.0)
    assert store.version == 0
    decision = store.pull_decision("job", "a", 1, 1)
    assert not decision.ready and decision.waiting_for == ("c",)
    assert "sync step 0" in decision.reason and "c" in decision.reason
    push(store, job, "c", 1, 6.0)
    assert store.version == 1 and store.pull_decision("job", "a", 1, 1).ready
    assert_weights(store, 3.0)  # mean of 1, 2, 6
    for w, g in (("a", 3.0), ("b", 3.0), ("c", 0.0)):
        push(store, job, w, 2, g)
    assert store.version == 2
    assert_weights(store, 5.0)
    assert store.view().counters.updates_applied == 2


def test_sync_drops_gradients_of_older_steps():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0)
    push(store, job, "b", 1, 1.0)
    late = push(store, job, "a", 2, 100.0, pulled=0)
    assert late.dropped and not late.applied and late.staleness == 1
    assert store.view().counters.stale_dropped == 1
    assert_weights(store, 1.0)


def test_sync_rejects_a_second_gradient_for_the_same_step():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0)
    with pytest.raises(FailedPrecondition, match="already pushed"):
        push(store, job, "a", 2, 1.0)


def test_sync_backup_workers_finish_the_step_without_the_slowest():
    store, job = new_store("sync", workers=["a", "b", "c", "d"], backup_workers=1)
    assert store.required_workers() == 3
    for w, g in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        push(store, job, w, 1, g)
    assert store.version == 1
    assert_weights(store, 2.0)
    straggler = push(store, job, "d", 1, 50.0, pulled=0)
    assert straggler.dropped
    assert_weights(store, 2.0)


def test_departed_worker_releases_the_sync_barrier():
    store, job = new_store("sync", workers=["a", "b", "c"])
    push(store, job, "a", 1, 1.0)
    push(store, job, "b", 1, 3.0)
    assert store.version == 0
    store.set_membership("job", ["a", "b"])
    assert store.version == 1
    assert_weights(store, 2.0)
    with pytest.raises(FailedPrecondition, match="left the job"):
        push(store, job, "c", 1, 1.0, pulled=0)
    store.set_membership("job", ["a", "b", "c"])  # rejoining is explicit
    assert push(store, job, "c", 1, 1.0).applied


def test_unknown_worker_joins_on_contact():
    store, job = new_store("sync", workers=["a"])
    store.pull("job", "b")
    assert store.active_workers() == ["a", "b"]
    push(store, job, "a", 1, 1.0)
    assert store.version == 0  # b is now required too
    push(store, job, "b", 1, 1.0)
    assert store.version == 1


# --------------------------------------------------------------------- ssp


def test_ssp_pull_waits_for_the_slowest_within_the_bound():
    store, job = new_store("ssp", workers=["fast", "slow"], staleness=1)
    push(store, job, "fast", 1, 1.0)
    assert store.pull_decision("job", "fast", 1, 0).ready  # 1 - 1 <= 0
    push(store, job, "fast", 2, 1.0)
    decision = store.pull_decision("job", "fast", 2, 0)
    assert not decision.ready and decision.waiting_for == ("slow",)
    assert "ssp clock 2 (staleness 1)" in decision.reason and "slow at clock 0" in decision.reason
    push(store, job, "slow", 1, 1.0)
    assert store.pull_decision("job", "fast", 2, 0).ready
    assert_weights(store, 3.0)  # pushes are applied at once


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_ssp_bound_holds_in_any_interleaving(staleness):
    """Simulate workers of different speeds: no granted pull is more than s ahead."""
    workers = {"w0": 1, "w1": 2, "w2": 5}  # iterations between turns
    store, job = new_store("ssp", workers=list(workers), staleness=staleness)
    clocks = dict.fromkeys(workers, 0)
    for tick in range(200):
        for w, period in workers.items():
            if tick % period:
                continue
            if store.pull_decision("job", w, clocks[w], 0).ready:
                assert clocks[w] - min(clocks.values()) <= staleness
                clocks[w] += 1
                push(store, job, w, clocks[w], 0.0)
    assert min(clocks.values()) >= 200 // 5 - 1
    assert max(clocks.values()) - min(clocks.values()) <= staleness + 1


def test_departed_worker_releases_the_ssp_bound():
    store, job = new_store("ssp", workers=["a", "b"], staleness=0)
    push(store, job, "a", 1, 1.0)
    assert not store.pull_decision("job", "a", 1, 0).ready
    store.set_membership("job", ["a"])
    assert store.pull_decision("job", "a", 1, 0).ready


def test_joining_worker_starts_at_the_slowest_clock():
    store, job = new_store("ssp", workers=["a"], staleness=0)
    for clock in (1, 2, 3):
        push(store, job, "a", clock, 0.0)
    _, clock, _ = store.pull("job", "new")
    assert clock == 3
    assert store.pull_decision("job", "a", 3, 0).ready  # the newcomer holds no one


def test_a_worker_whose_first_call_is_a_push_joins_at_the_slowest_clock():
    store, job = new_store("ssp", workers=["a"], staleness=2)
    for clock in range(1, 11):
        push(store, job, "a", clock, 0.0, session="sa")
    assert push(store, job, "b", 1, 0.0, session="sb").applied  # b's first call
    assert {w.worker_id: w.clock for w in store.view().workers} == {"a": 10, "b": 11}
    assert store.pull_decision("job", "a", 11, 0, "sa").ready  # b holds no one back
    assert push(store, job, "b", 1, 0.0, session="sb").duplicate  # its retry: acknowledged
    assert push(store, job, "b", 11, 0.0, session="sb").duplicate
    assert push(store, job, "b", 12, 0.0, session="sb").applied  # its next, at the adopted clock
    _, clock, _ = store.pull("job", "b", session="sb")
    assert clock == 12


def test_waiting_lists_reasons():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0)
    token = store.add_waiter(Waiter("a", 1, 1))
    ((waiter, decision),) = store.waiting()
    assert waiter.worker_id == "a" and decision.waiting_for == ("b",)
    store.remove_waiter(token)
    assert store.waiting() == []


# ----------------------------------------------------------------- errors


def bad(job, mutate):
    chunks = chunks_for(job, grads(1.0))
    mutate(chunks)
    return chunks


def edit(**fields):
    """A mutation: the first chunk with some fields replaced (callables get the chunk)."""

    def apply(chunks):
        c = chunks[0]
        chunks[0] = replace(c, **{k: v(c) if callable(v) else v for k, v in fields.items()})

    return apply


def filled(pattern: bytes):
    return lambda c: memoryview(pattern * (len(c.data) // len(pattern)))


ERRORS = [
    ("unknown tensor", edit(tensor="nope"), "unknown tensor 'nope'"),
    ("part not held", edit(part=9), "part 9 is not held"),
    ("wrong dtype", edit(dtype=ps_pb2.FLOAT16), "dtype float16"),
    ("byte length", edit(data=lambda c: c.data[:-1]), "not a whole number"),
    ("short", edit(data=lambda c: c.data[:-4]), "missing|of \\d+ values"),
    ("missing part", lambda c: c.pop(), "0 of"),
    ("duplicated chunk", lambda c: c.append(c[0]), "sent twice|exceed"),
    ("out of range", edit(offset=1000), "exceed"),
    ("nan", edit(data=filled(b"\x00\x00\xc0\x7f")), "NaN or Inf"),
    ("inf", edit(data=filled(b"\x00\x00\x80\x7f")), "NaN or Inf"),
]


@pytest.mark.parametrize(("what", "mutate", "message"), ERRORS, ids=[e[0] for e in ERRORS])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bad_push_changes_nothing(what, mutate, message, mode):
    store, job = new_store(mode, workers=["a", "b"])
    before = {k: v.clone() for k, v in weights(store).items()}
    with pytest.raises(InvalidArgument, match=message):
        store.push("job", "a", 1, 0, bad(job, mutate))
    after = weights(store)
    assert all(torch.equal(before[k], after[k]) for k in before)
    view = store.view()
    assert view.version == 0 and view.counters.pushes_received == 0
    assert ("a", 0) in [(w.worker_id, w.clock) for w in view.workers] and not view.contributors
    assert push(store, job, "a", 1, 1.0).applied  # still serving


def test_state_errors():
    store = ParameterStore()
    job = make_job("async")
    with pytest.raises(FailedPrecondition, match="not initialised"):
        store.push("job", "a", 1, 0, chunks_for(job, grads(1.0)))
    store.initialise(job, chunks_for(job, initial_values()))
    assert not store.initialise(job, chunks_for(job, initial_values()))  # identical: no-op
    with pytest.raises(AlreadyExists, match="mode, optimizer"):
        store.initialise(make_job("sync", optimizer=Adam()), [])
    with pytest.raises(NotFound, match="unknown job 'other'"):
        store.push("other", "a", 1, 0, chunks_for(job, grads(1.0)))
    with pytest.raises(InvalidArgument, match="bad clock 0"):
        store.push("job", "a", 0, 0, chunks_for(job, grads(1.0)))
    with pytest.raises(InvalidArgument, match="ahead of this server's version"):
        store.push("job", "a", 1, 5, chunks_for(job, grads(1.0)))


def test_bad_init_changes_nothing():
    store = ParameterStore()
    job = make_job("async")
    chunks = chunks_for(job, initial_values())
    with pytest.raises(InvalidArgument, match="initial value"):
        store.initialise(job, chunks[:-1])
    assert store.job is None
    assert store.initialise(job, chunks)


def test_observing_pull_neither_joins_nor_waits():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0)
    version, clock, pieces = store.pull("job", "evaluator", observe=True)
    assert version == 0 and clock == 0 and pieces
    assert store.active_workers() == ["a", "b"]  # the sync barrier still counts two


# ------------------------------------------------------------ owned state


def test_a_view_is_an_immutable_snapshot():
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 1.0)
    view = store.view()
    push(store, job, "b", 1, 1.0)  # finishes step 0
    assert (view.version, view.contributors, view.counters.pushes_received) == (0, ("a",), 1)
    assert view.active_workers == ("a", "b")
    assert view.parameter_bytes == 43 * 4 + 4 * 8
    later = store.view()
    assert (later.version, later.contributors, later.counters.pushes_received) == (1, (), 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.version = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        view.counters.staleness[0] = 9  # type: ignore[index]
    with pytest.raises(AttributeError):
        store.version = 5  # type: ignore[misc]


def test_state_copies_out_and_back_in_exactly():
    store, job = new_store("sync", workers=["a", "b"], optimizer=Adam())
    push(store, job, "a", 1, 1.0)
    push(store, job, "b", 1, 3.0)
    push(store, job, "a", 2, 2.0)  # step 1 half done: the partial sum travels too
    state = store.snapshot_state()
    assert state is not None and state.view == store.view()
    copy = ParameterStore()
    copy.restore_state(state)
    assert copy.view() == store.view()
    for s in (store, copy):
        push(s, job, "b", 2, 4.0)
    assert copy.version == store.version == 2
    for name, value in weights(store).items():
        assert torch.equal(value, weights(copy)[name]), name
    assert ParameterStore().snapshot_state() is None


def test_a_state_that_does_not_fit_changes_nothing():
    store, job = new_store("async", optimizer=Adam())
    push(store, job, "a", 1, 1.0)
    state = store.snapshot_state()
    assert state is not None
    float32 = state.groups["float32"]
    broken = {**state.groups, "float32": GroupState(float32.param[:-1], float32.state)}
    fresh = ParameterStore()
    with pytest.raises(InvalidArgument, match="'float32/param' is missing or does not fit"):
        fresh.restore_state(StoreState(state.view, broken))
    no_state = {**state.groups, "float64": GroupState(state.groups["float64"].param, {})}
    with pytest.raises(InvalidArgument, match="'float64/state/exp_avg' is missing"):
        fresh.restore_state(StoreState(state.view, no_state))
    assert fresh.job is None and fresh.snapshot_state() is None
    with pytest.raises(AlreadyExists, match="already holds job 'job'"):
        store.restore_state(state)


def test_the_store_knows_nothing_of_grpc():
    inside = {"ps_server.errors", "ps_server.flat", "ps_server.records", "ps_server.sessions"}
    inside |= {"ps_server.clocks", "ps_server.workers", "ps_server.rules"}
    inside |= {"ps_server.compensation"}
    modules = ("store.py", "flat.py", "records.py", "sessions.py", "clocks.py", "workers.py")
    for module in (*modules, "rules.py", "compensation.py"):
        tree = ast.parse((Path(ps_server.__file__).parent / module).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert (
            not {m for m in imported if m and m.split(".")[0] in ("grpc", "ps_server")} - inside
        ), module
