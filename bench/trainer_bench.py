"""PPO episodes/s: Flywheel's PPOTrainer vs TRL 1.9.2's experimental PPOTrainer, same model and batch.

    python bench/trainer_bench.py [--updates 6] [--repeats 2] [--precision-steps 1] [--precision-only]

Setup (identical for both): a 2-layer, 64-dim GPT-2 (random weights, SmolLM2's 49k tokenizer),
a tiny GPT-2 sequence-classification reward model, batch 8 prompts of 8 tokens, 16-token sampled
responses (temperature 1, no top-k/top-p), 4 PPO epochs, one minibatch of 8, fixed KL 0.05.
An "episode" is one prompt -> sampled response -> reward -> PPO update. Each system runs one
warm-up update, then `--updates` timed updates; the best of `--repeats` runs is reported.

- TRL runs in its own virtualenv (~/.cache/flywheel/bench-trl-venv, `trl==1.9.2` from
  bench/requirements-trl.txt), created on first use; it shares this venv's torch/transformers
  through a .pth file so only TRL and its extra dependencies are installed there. TRL uses a
  separate value model (its design); Flywheel uses a value head on the policy (its design).
- Flywheel end-to-end: HF generate (behaviour log-probs from the generation scores, as the policy
  service reports them) + reward-model forward + `PPOTrainer.step`. The "update only" row is what
  the trainer service itself spends per batch (generation and scoring happen in other services).

A second table, PPO step time per precision (`trainer_dtype`), runs the real policy at the loop's
PPO config (SmolLM2-135M, batch 32 of 8 samples x 4 chat prompts with 24-token responses, ~60
tokens a row, minibatch 8, 2 epochs; LoopConfig): float32 (the baseline) against bfloat16
autocast, each with a fresh fp32 policy + reference, one short warm-up step on 8 rows, then
`--precision-steps` timed steps on the same batch. Its behaviour log-probs are the fp32 model's (an
fp32 sampler), so the table also shows the sampler-trainer mismatch KL each trainer precision
measures and whether TIS switched on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = Path.home() / ".cache" / "flywheel" / "bench-trl-venv"
REQUIREMENTS = Path(__file__).resolve().parent / "requirements-trl.txt"

BATCH = 8
PROMPT_LEN = 8
RESPONSE_LEN = 16
EPOCHS = 4
KL_COEF = 0.05
LR = 3e-6


def _models(seed: int = 0):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    sys.path.insert(0, str(REPO / "services"))
    from flywheel.models import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    tokenizer.padding_side = "left"
    cfg = dict(vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=128,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(GPT2Config(**cfg))
    ref = GPT2LMHeadModel(GPT2Config(**cfg))
    ref.load_state_dict(policy.state_dict())
    torch.manual_seed(seed + 1)
    reward = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **cfg))
    torch.manual_seed(seed + 2)
    value = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **cfg))
    return tokenizer, policy, ref, reward, value


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (n, PROMPT_LEN), generator=g).tolist()


# -----------------------------------------------------------------------------------------------
# Flywheel
# -----------------------------------------------------------------------------------------------


def run_flywheel(updates: int, threads: int) -> dict[str, float]:
    import torch

    sys.path.insert(0, str(REPO / "services"))
    from flywheel.trainer.batch import collate
    from flywheel.trainer.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer
    from flywheel.v1 import common_pb2

    torch.set_num_threads(threads)
    tokenizer, policy_lm, ref, reward_model, _ = _models()
    policy_lm.eval()
    reward_model.eval()
    trainer = PPOTrainer(PPOConfig(ppo_epochs=EPOCHS, mini_batch_size=BATCH, kl_coef=KL_COEF, learning_rate=LR,
                                   max_grad_norm=0.5), PolicyWithValueHead(policy_lm), ref)
    prompts = _prompts(BATCH * (updates + 1), len(tokenizer))
    total, update_only, cpu = [], [], []
    for u in range(updates + 1):
        start = time.perf_counter()
        cpu_start = time.process_time()
        batch_prompts = torch.tensor(prompts[u * BATCH:(u + 1) * BATCH])
        with torch.inference_mode():
            out = policy_lm.generate(batch_prompts, attention_mask=torch.ones_like(batch_prompts), do_sample=True,
                                     max_new_tokens=RESPONSE_LEN, temperature=1.0, top_k=0, top_p=1.0,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=tokenizer.pad_token_id)
            responses = out.sequences[:, PROMPT_LEN:]
            logits = torch.stack(out.logits, 1).float()
            behaviour = torch.log_softmax(logits, -1).gather(-1, responses[:, :, None]).squeeze(-1)
            scores = reward_model(out.sequences).logits[:, 0]
        rollouts = []
        for i in range(BATCH):
            resp = responses[i].tolist()
            ro = common_pb2.Rollout(rollout_id=f"{u}-{i}", prompt_token_ids=batch_prompts[i].tolist(),
                                    response_token_ids=resp, token_logprobs=behaviour[i].tolist(),
                                    policy_version="policy-0000", finish_reason=common_pb2.FINISH_REASON_LENGTH,
                                    sampling=common_pb2.SamplingParams(temperature=1.0))
            rollouts.append(common_pb2.ScoredRollout(rollout=ro, reward=float(scores[i])))
        step_start = time.perf_counter()
        trainer.step(collate(rollouts, pad_token_id=tokenizer.pad_token_id))
        end = time.perf_counter()
        if u > 0:  # the first update is warm-up
            total.append(end - start)
            update_only.append(end - step_start)
            cpu.append(time.process_time() - cpu_start)
    return {"episodes_per_s": BATCH * updates / sum(total),
            "update_only_episodes_per_s": BATCH * updates / sum(update_only),
            "episodes_per_cpu_s": BATCH * updates / sum(cpu)}


# -----------------------------------------------------------------------------------------------
# PPO step time per precision on the real policy (SmolLM2-135M) at the loop's config
# -----------------------------------------------------------------------------------------------


def loop_batch(lm, tokenizer, config):
    """32 sampled rollouts as the loop makes them (4 chat prompts x 8 candidates), fp32 behaviour log-probs."""
    import dataclasses

    import torch

    from flywheel.trainer.batch import collate
    from flywheel.trainer.ppo import response_forward
    from flywheel.v1 import common_pb2

    prompts = ["What is your favourite food?", "Tell me about the weather today.",
               "How do you feel about Mondays?", "Do you like music?"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    rollouts = []
    for text in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_new_tokens, num_return_sequences=config.candidates,
                              eos_token_id=eos, pad_token_id=eos)
        for seq in out[:, ids.shape[1]:].tolist():
            response = seq[:seq.index(eos) + 1] if eos in seq else seq
            rollouts.append(common_pb2.ScoredRollout(reward=float(len(rollouts) % 5) - 2.0, rollout=common_pb2.Rollout(
                rollout_id=f"r{len(rollouts)}", prompt_token_ids=ids[0].tolist(), response_token_ids=response,
                token_logprobs=[0.0] * len(response), policy_version="policy-0000",
                sampling=common_pb2.SamplingParams(temperature=config.temperature))))
    batch = collate(rollouts, pad_token_id=eos)
    with torch.inference_mode():
        behaviour, _, _ = response_forward(lm, batch.input_ids, batch.attention_mask, batch.prompt_lengths,
                                           batch.response_ids, batch.temperature)
    return dataclasses.replace(batch, behaviour_logprobs=behaviour.clone() * batch.response_mask)


def run_precision(precisions: list[str], steps: int, threads: int) -> list[dict[str, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.loop.runner import LoopConfig
    from flywheel.models import smollm2_checkpoint
    from flywheel.trainer.ppo import PolicyWithValueHead, PPOTrainer
    from flywheel.trainer.settings import TrainerSettings

    torch.set_num_threads(threads)
    loop = LoopConfig()
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = loop_batch(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, loop)
    rows = []
    for dtype in precisions:
        cfg = TrainerSettings(
            trainer_batch_size=loop.ppo_batch_size, trainer_mini_batch_size=loop.ppo_mini_batch_size,
            trainer_ppo_epochs=loop.ppo_epochs, trainer_learning_rate=loop.learning_rate,
            trainer_kl_coef=loop.kl_coef, trainer_adaptive_kl=loop.adaptive_kl, trainer_target_kl=loop.target_kl,
            trainer_kl_horizon=loop.kl_horizon, trainer_dtype=dtype).ppo_config()
        torch.manual_seed(cfg.seed)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        policy = PolicyWithValueHead(lm)
        initial = {k: v.clone() for k, v in policy.state_dict().items()}
        PPOTrainer(cfg, policy, ref).step(batch.select(range(cfg.mini_batch_size)))  # warm-up: kernels, 1/8 step
        policy.load_state_dict(initial)  # the timed step starts where the sampler was: policy == reference
        trainer = PPOTrainer(cfg, policy, ref)
        wall, cpu, stats = [], [], []
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            stats.append(trainer.step(batch))
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        rows.append({"dtype": dtype, "resolved": trainer.compute_dtype, "step_s": min(wall), "cpu_s": min(cpu),
                     "mismatch_kl": stats[0].mismatch_kl, "tis": stats[0].tis_active, "kl": stats[0].kl,
                     "tokens": stats[0].num_tokens, "rows": len(batch), "width": batch.input_ids.shape[1]})
        del trainer, policy, initial, lm, ref
    return rows


def print_precision_table(rows: list[dict[str, float]], steps: int, threads: int) -> None:
    base = rows[0]
    print(f"PPO step time per precision - SmolLM2-135M, the loop's config (batch {base['rows']}, minibatch 8, "
          f"2 epochs, {base['tokens']} response tokens, rows up to {base['width']} tokens), {threads} threads, "
          f"best of {steps} step(s) after an 8-row warm-up; load average {os.getloadavg()[0]:.1f}")
    print()
    print("| trainer_dtype | computes in | step s (wall) | CPU s | vs float32 (CPU) | mismatch KL vs fp32 sampler "
          "| TIS | KL(pi‖ref) at step 0 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['dtype']} | {r['resolved']} | {r['step_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{base['cpu_s'] / r['cpu_s']:.2f}x | {r['mismatch_kl']:.2e} | {'on' if r['tis'] else 'off'} | "
              f"{r['kl']:.2g} |")


# -----------------------------------------------------------------------------------------------
# TRL 1.9.2 (runs inside the TRL venv)
# -----------------------------------------------------------------------------------------------


def run_trl(updates: int, threads: int) -> dict[str, float]:
    import os as _os
    import tempfile

    _os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(threads)
    tokenizer, policy, ref, reward, value = _models()
    prompts = _prompts(BATCH * (updates + 1), len(tokenizer))
    dataset = Dataset.from_dict({"input_ids": prompts})
    stamps: list[float] = []
    cpu_stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                         num_mini_batches=1, num_ppo_epochs=EPOCHS, response_length=RESPONSE_LEN,
                         total_episodes=BATCH * (updates + 1), local_rollout_forward_batch_size=BATCH,
                         kl_coef=KL_COEF, learning_rate=LR, temperature=1.0, num_sample_generations=0,
                         report_to=[], save_strategy="no", logging_steps=1000, use_cpu=True, bf16=False,
                         fp16=False, seed=0, dataloader_num_workers=0, max_grad_norm=0.5)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=dataset, value_model=value, callbacks=[Stamp()])
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train()
    stamps.insert(0, start)
    cpu_stamps.insert(0, cpu_start)
    durations = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # drop the warm-up update
    cpu = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])][1:]
    return {"episodes_per_s": BATCH * len(durations) / sum(durations),
            "episodes_per_cpu_s": BATCH * len(cpu) / sum(cpu), "trl_version": trl.__version__}


# -----------------------------------------------------------------------------------------------
# Driver
# -----------------------------------------------------------------------------------------------


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    ok = python.exists() and subprocess.run(
        [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '1.9.2')"], capture_output=True).returncode == 0
    if ok:
        return python
    print(f"creating the TRL baseline venv in {TRL_VENV} (one time) ...", file=sys.stderr)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(TRL_VENV)], check=True)
    import sysconfig

    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Share this venv's torch/transformers; TRL's own pins take precedence (installed into the TRL venv).
    Path(site, "flywheel-main-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=6, help="timed PPO updates per run (after 1 warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per system; the best is reported")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--precision-steps", type=int, default=1,
                        help="timed SmolLM2 PPO steps per precision (one fp32 step: ~50 s on one core)")
    parser.add_argument("--precision-threads", type=int, default=1, help="torch threads of the precision table")
    parser.add_argument("--precision-only", action="store_true", help="only the PPO step time per precision")
    parser.add_argument("--worker", choices=["trl", "flywheel"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker:  # the precision table runs in this process
        sys.path.insert(0, str(REPO / "services"))
    if args.precision_only:
        rows = run_precision(["float32", "bfloat16"], args.precision_steps, args.precision_threads)
        print_precision_table(rows, args.precision_steps, args.precision_threads)
        return
    if args.worker:
        fn = run_trl if args.worker == "trl" else run_flywheel
        print("RESULT " + json.dumps(fn(args.updates, args.threads)))
        return

    trl_python = ensure_trl_venv()
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO / "services"))

    def run(python: str, worker: str) -> dict:
        proc = subprocess.run([python, __file__, "--worker", worker, "--updates", str(args.updates),
                               "--threads", str(args.threads)], capture_output=True, text=True, env=env, cwd=REPO)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{worker} run failed:\n{proc.stderr[-4000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    trl_runs, fw_runs = [], []
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both
        trl_runs.append(run(str(trl_python), "trl"))
        fw_runs.append(run(sys.executable, "flywheel"))
    trl_best = max(r["episodes_per_s"] for r in trl_runs)
    fw_best = max(r["episodes_per_s"] for r in fw_runs)
    fw_update = max(r["update_only_episodes_per_s"] for r in fw_runs)
    trl_cpu = max(r["episodes_per_cpu_s"] for r in trl_runs)
    fw_cpu = max(r["episodes_per_cpu_s"] for r in fw_runs)
    rows = [
        (f"TRL {trl_runs[0].get('trl_version', '1.9.2')} experimental PPOTrainer (end to end)", trl_best, 1.0,
         trl_cpu, 1.0),
        ("Flywheel PPOTrainer (end to end: generate + score + update)", fw_best, fw_best / trl_best,
         fw_cpu, fw_cpu / trl_cpu),
        ("Flywheel PPOTrainer (update only: what the trainer service spends)", fw_update, fw_update / trl_best,
         None, None),
    ]
    print(f"PPO episodes/s - GPT-2 2x64, batch {BATCH}, {RESPONSE_LEN}-token responses, {EPOCHS} epochs, "
          f"{args.threads} threads, {args.updates} timed updates, best of {args.repeats} (interleaved runs)")
    print()
    print("| system | episodes/s (wall) | vs TRL | episodes per CPU-second | vs TRL |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, eps, ratio, cpu, cpu_ratio in rows:
        cpu_cells = f"{cpu:.2f} | {cpu_ratio:.2f}x" if cpu is not None else "- | -"
        print(f"| {name} | {eps:.2f} | {ratio:.2f}x | {cpu_cells} |")
    print()
    print("all runs (episodes/s wall): TRL " + ", ".join(f"{r['episodes_per_s']:.2f}" for r in trl_runs)
          + "; Flywheel " + ", ".join(f"{r['episodes_per_s']:.2f}" for r in fw_runs))
    print("CPU-seconds count the work done, so they are the fairer figure on a shared, loaded machine.")
    print()
    rows = run_precision(["float32", "bfloat16"], args.precision_steps, args.precision_threads)
    print_precision_table(rows, args.precision_steps, args.precision_threads)


if __name__ == "__main__":
    main()
