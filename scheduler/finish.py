"""A finished job: its trained model out of the servers as one safetensors file, then the
job dropped from the servers, freeing them for another.

    model = build_model(spec.model, spec.seed)
    model.load_state_dict(safetensors.torch.load_file(path))

The servers hold the model's parameters; its buffers (BatchNorm's running
statistics, say) live in each worker and are written as the model builds them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from protos import outfile
from protos.jobspec import JobSpec
from protos.security import ClientSecurity
from ps_worker import Client, ClientConfig, PSError
from ps_worker.models import build_model

SAVE_TIMEOUT_S = 60.0
DISCARDED_END_TIMEOUT_S = 5.0  # per server, when --fresh ends the job it discarded
SAVE_HELP = (
    "when the job finishes, write the trained model here as safetensors "
    "(load_state_dict(safetensors.torch.load_file(PATH)))"
)


END_JOB_HELP = (
    "when the job finishes (and its model is saved), drop it from the servers, freeing "
    "them for another job (default on)"
)


def _client(spec: JobSpec, security: ClientSecurity) -> Client:
    """An observer of the job: it never joins it, so closing it leaves nothing to leave."""
    config = ClientConfig(timeout_s=SAVE_TIMEOUT_S, security=security)
    return Client(list(spec.servers), job_id=spec.job_id, config=config)


def final_state_dict(spec: JobSpec, security: ClientSecurity) -> dict[str, torch.Tensor]:
    """The job's model with the servers' current weights, as a state dict (CPU tensors)."""
    with _client(spec, security) as client:
        state = client.state_dict(build_model(spec.model, spec.seed))
    # Each tensor its own memory: safetensors refuses tied tensors that share it.
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def save_model(spec: JobSpec, security: ClientSecurity, path: Path) -> None:
    """Write the servers' final weights to ``path`` (a new file, then a rename; never in
    place of a device, FIFO, socket, directory or symbolic link)."""
    outfile.check(path, "--save")  # before the weights are fetched
    state = final_state_dict(spec, security)
    metadata = {"model": spec.model, "job_id": spec.job_id}
    outfile.write(path, "--save", lambda tmp: save_file(state, tmp, metadata=metadata))


def end_job(spec: JobSpec, security: ClientSecurity) -> list[bool]:
    """Drop the job from its servers; for each, whether it held the job."""
    with _client(spec, security) as client:
        return client.end_job()


def end_job_on_each(
    spec: JobSpec, security: ClientSecurity, timeout_s: float = DISCARDED_END_TIMEOUT_S
) -> tuple[list[str], list[str]]:
    """Best effort: drop the job from each of its servers on its own, so that one that
    cannot be reached stops none of the others. Returns the servers that held it, and a
    line for each that could not be asked."""
    held, failed = [], []
    for address in spec.servers:
        config = ClientConfig(timeout_s=timeout_s, security=security)
        try:
            with Client([address], job_id=spec.job_id, config=config) as client:
                if client.end_job()[0]:
                    held.append(address)
        except PSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            failed.append(f"{address}: {first}")
    return held, failed
