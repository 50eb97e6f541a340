"""Checkpoints of the parameter store: exact round trips, atomic writes, bad files refused."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from protos.optimizers import Adam
from ps_server import checkpoint
from ps_server.checkpoint import CheckpointError
from ps_server.store import ParameterStore
from scheduler.launch import BIN
from tests.storekit import chunks_for, initial_values, new_store, push, weights


def restored(tmp_path, store) -> ParameterStore:
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    fresh = ParameterStore()
    checkpoint.restore(fresh, checkpoint.read(tmp_path))
    return fresh


def assert_same(a: ParameterStore, b: ParameterStore) -> None:
    for name, w in weights(a).items():
        assert torch.equal(w, weights(b)[name]), name
    sa, sb = a.snapshot_state(), b.snapshot_state()
    assert sa is not None and sb is not None
    for name, group in sa.groups.items():
        for key, value in group.state.items():
            assert torch.equal(value, sb.groups[name].state[key]), (name, key)
    assert sa.view == sb.view  # job, steps, version, workers, contributors, counters


def test_async_adam_state_round_trips_and_training_continues_identically(tmp_path):
    store, job = new_store("async", optimizer=Adam(), lr=0.1)
    for clock in range(1, 4):
        push(store, job, "w0", clock, 0.5 * clock)
    copy = restored(tmp_path, store)
    assert_same(store, copy)
    for s in (store, copy):  # the same next step on both
        push(s, job, "w0", 4, -1.0)
    assert_same(store, copy)
    # a retried push the checkpoint already holds is still a duplicate
    assert push(copy, job, "w0", 3, 9.0).duplicate


def test_a_sync_step_in_progress_keeps_its_partial_sum(tmp_path):
    store, job = new_store("sync", workers=["a", "b"])
    push(store, job, "a", 1, 2.0)  # b has not pushed: step 0 is half done
    copy = restored(tmp_path, store)
    assert copy.view().contributors == ("a",) and copy.version == 0
    push(copy, job, "b", 1, 4.0, pulled=0)
    push(store, job, "b", 1, 4.0, pulled=0)
    assert copy.version == 1
    assert_same(store, copy)


def test_a_checkpoint_replaces_the_previous_one_atomically(tmp_path):
    store, job = new_store("async")
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    push(store, job, "w", 1, 1.0)
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0] == "manifest.json"  # the old tensor file is gone
    assert checkpoint.read(tmp_path).version == 1
    # leftovers of a write that crashed before its rename change nothing
    (tmp_path / ".state-x.safetensors.partial").write_bytes(b"torn")
    (tmp_path / ".manifest.json.partial").write_text("{")
    assert checkpoint.read(tmp_path).version == 1


def test_no_checkpoint_is_none_and_a_damaged_one_is_refused(tmp_path):
    assert checkpoint.read(tmp_path) is None
    store, _ = new_store("async")
    manifest = checkpoint.write(checkpoint.snapshot(store), tmp_path)
    data = json.loads(manifest.read_text())
    tensors = tmp_path / data["tensors"]
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.read(tmp_path)
    tensors.write_bytes(blob)
    manifest.write_text(json.dumps({**data, "format": 99}))
    with pytest.raises(CheckpointError, match="format"):
        checkpoint.read(tmp_path)
    manifest.write_text(json.dumps({**data, "job": "bm90IGEgam9i"}))
    with pytest.raises(CheckpointError, match="valid job"):
        checkpoint.restore(ParameterStore(), checkpoint.read(tmp_path))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text", ["[]", "null", "3", '"manifest"', '{"format": 1, "tensors": 5}'])
def test_a_manifest_that_is_not_a_json_object_is_refused_in_one_line(tmp_path, text):
    store, _ = new_store("async")
    manifest = checkpoint.write(checkpoint.snapshot(store), tmp_path)
    data = json.loads(manifest.read_text())
    manifest.write_text(text.replace("1", str(data["format"])))
    with pytest.raises(CheckpointError, match=f"cannot read the checkpoint in {tmp_path}") as info:
        checkpoint.read(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_ps_server_refuses_a_manifest_that_is_not_an_object_in_one_line(tmp_path):
    (tmp_path / checkpoint.MANIFEST).write_text("[]")
    argv = [str(BIN / "ps-server"), "--port", "0", "--checkpoint-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=25)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"ps-server: cannot read the checkpoint in {tmp_path}: manifest.json holds [], "
        f"not a JSON object"
    )


def test_restore_needs_an_empty_store_and_snapshot_needs_a_model(tmp_path):
    assert checkpoint.snapshot(ParameterStore()) is None
    store, _ = new_store("async")
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    with pytest.raises(CheckpointError, match="already holds"):
        checkpoint.restore(store, checkpoint.read(tmp_path))


def test_workers_ahead_of_a_restored_sync_server_are_sent_back_not_stuck(tmp_path):
    store, job = new_store("sync", workers=["a"])
    checkpoint.write(checkpoint.snapshot(store), tmp_path)  # at step 0
    push(store, job, "a", 1, 1.0)  # step 1 happens, then the server dies
    copy = ParameterStore()
    checkpoint.restore(copy, checkpoint.read(tmp_path))
    result = push(copy, job, "a", 2, 1.0, pulled=1)  # computed on weights the server lost
    assert result.dropped and result.version == 0 and copy.view().counters.stale_dropped == 1
    assert copy.pull_decision("job", "a", 2, min_version=2).ready  # no wait for a lost step
    assert not copy.pull_decision("job", "a", 2, min_version=1).ready  # the next one is normal
    assert push(copy, job, "a", 3, 1.0, pulled=0).applied and copy.version == 1


def test_a_checkpoint_whose_tensors_do_not_fit_the_job_is_refused(tmp_path):
    store, job = new_store("async", optimizer=Adam())
    push(store, job, "w", 1, 1.0)
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    for key, change in [
        ("float32/param", lambda t: t[:-1]),
        ("float64/state/exp_avg", lambda t: t.float()),
        ("float32/param", None),  # missing
    ]:
        snap = checkpoint.read(tmp_path)
        if change is None:
            del snap.tensors[key]
        else:
            snap.tensors[key] = change(snap.tensors[key])
        fresh = ParameterStore()
        with pytest.raises(CheckpointError, match=f"'{key}' is missing or does not fit"):
            checkpoint.restore(fresh, snap)
        assert fresh.job is None


def test_a_discarded_checkpoint_is_gone_and_a_snapshot_taken_before_is_not_written(tmp_path):
    store, job = new_store("async")
    push(store, job, "w", 1, 1.0)
    checkpointer = checkpoint.Checkpointer(store, tmp_path, checkpoint.Every(versions=1))
    assert checkpointer.due() and checkpointer.save(checkpointer.snapshot()) is not None
    before = checkpointer.snapshot()  # e.g. taken by the periodic loop just before an EndJob
    checkpointer.discard()
    assert checkpoint.read(tmp_path) is None and not list(tmp_path.iterdir())
    assert checkpointer.save(before) is None and not list(tmp_path.iterdir())
    store.end("job")
    assert checkpointer.snapshot() is None and not checkpointer.due()
    store.initialise(job, chunks_for(job, initial_values()))  # the next job starts afresh
    push(store, job, "w", 1, 1.0)
    assert checkpointer.due() and checkpointer.save(checkpointer.snapshot()) is not None
    assert checkpoint.read(tmp_path).version == 1


def test_partial_files_of_writes_a_crash_cut_short_do_not_pile_up(tmp_path):
    store, _ = new_store("async")
    cut_short = [tmp_path / f".state-{i:012d}-deadbeef.safetensors.partial" for i in range(3)]
    for path in cut_short:  # what a server SIGKILLed in the middle of a write leaves
        path.write_bytes(b"x" * 100)
    (tmp_path / "notes.txt").write_text("a person's file")
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    assert not any(p.exists() for p in cut_short)
    assert (tmp_path / "notes.txt").exists() and checkpoint.read(tmp_path) is not None
    cut_short[0].write_bytes(b"x")
    checkpointer = checkpoint.Checkpointer(store, tmp_path, checkpoint.Every(versions=1))
    checkpointer.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
