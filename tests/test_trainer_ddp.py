"""PPO under torchrun: 2 CPU processes, gloo, DistributedDataParallel.

The test launches this same file with `torchrun --nproc_per_node 2`; each rank then runs
`worker()` (the `__main__` block) and rank 0 writes what it observed to a JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def worker(out_dir: Path) -> None:
    import copy

    import torch
    import torch.distributed as dist

    from flywheel.trainer.batch import collate
    from flywheel.trainer.loop import _encode, follow
    from flywheel.trainer.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer
    from flywheel.trainer.testing import tiny_gpt2
    from flywheel.v1 import common_pb2

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lm, ref = tiny_gpt2(seed=0).eval(), tiny_gpt2(seed=0).eval()
    policy = PolicyWithValueHead(lm, value_head_init_std=0.02)
    torch.manual_seed(123)  # value head init identical on both ranks (DDP also broadcasts rank 0's)
    ddp = torch.nn.parallel.DistributedDataParallel(policy)

    # The same global batch on every rank (as rank 0 would broadcast it); different shards.
    g = torch.Generator().manual_seed(7)
    rollouts = []
    for i in range(8):
        p = torch.randint(0, 1000, (4 + i % 3,), generator=g).tolist()
        r = torch.randint(0, 1000, (6 + i % 4,), generator=g).tolist()
        ro = common_pb2.Rollout(rollout_id=f"r{i}", prompt_token_ids=p, response_token_ids=r,
                                token_logprobs=[-7.0] * len(r), policy_version="policy-0000",
                                finish_reason=common_pb2.FINISH_REASON_EOS_TOKEN)
        rollouts.append(common_pb2.ScoredRollout(rollout=ro, reward=float(i % 3)))
    shard = collate(rollouts).shard(rank, world)

    # 1) Gradients are averaged: DDP grad == mean over ranks of each rank's local (non-DDP) grad.
    plain = copy.deepcopy(policy)

    def loss_of(model):
        lp, ent, values = model(shard.input_ids, shard.attention_mask, shard.prompt_lengths, shard.response_ids,
                                shard.temperature)
        return (lp * shard.response_mask).sum() + (values * shard.response_mask).pow(2).sum()

    loss_of(ddp).backward()
    loss_of(plain).backward()
    ddp_grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    local_grad = torch.cat([p.grad.flatten() for p in plain.parameters()])
    gathered = [torch.zeros_like(local_grad) for _ in range(world)]
    dist.all_gather(gathered, local_grad)
    mean_grad = torch.stack(gathered).mean(0)
    grads_averaged = torch.allclose(ddp_grad, mean_grad, rtol=1e-4, atol=1e-6)
    local_grads_differ = not torch.allclose(gathered[0], gathered[1])
    policy.zero_grad(set_to_none=True)

    # 2) PPO steps: rank 0 broadcasts the batch exactly as TrainerLoop does, rank 1 follows it.
    before = torch.cat([p.detach().flatten() for p in policy.parameters()]).clone()
    trainer = PPOTrainer(PPOConfig(ppo_epochs=2, mini_batch_size=2, learning_rate=1e-3), ddp, ref)
    kls = []
    if rank == 0:
        for _ in range(2):
            # (records, weights, the trainer's current version: which rows the mismatch KL measures)
            dist.broadcast_object_list([(*_encode(rollouts, [1.0] * len(rollouts)), None)], src=0)
            kls.append(trainer.step(collate(rollouts).shard(rank, world), current_version=None).kl)
        dist.broadcast_object_list([None], src=0)
        followed = 2
    else:
        followed = follow(trainer, pad_token_id=0)
    after = torch.cat([p.detach().flatten() for p in policy.parameters()])
    everyone = [torch.zeros_like(after) for _ in range(world)]
    dist.all_gather(everyone, after)
    if rank == 0:
        (out_dir / "result.json").write_text(json.dumps({
            "world": world, "grads_averaged": grads_averaged, "local_grads_differ": local_grads_differ,
            "params_identical": all(torch.equal(everyone[0], e) for e in everyone[1:]),
            "params_changed": not torch.equal(before, after), "followed": followed, "kls": kls,
            "global_step": trainer.global_step,
        }))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo sockets closing in arbitrary order can abort a peer


@pytest.mark.slow
def test_ddp_two_cpu_processes_average_gradients_and_agree(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__)), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2
    assert result["local_grads_differ"]  # the shards really differ...
    assert result["grads_averaged"]  # ...and DDP averaged their gradients
    assert result["params_identical"]  # every rank ends with the same weights
    assert result["params_changed"]
    assert result["followed"] == 2 and result["global_step"] == 2


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
