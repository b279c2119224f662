"""`flowtrain train`: the one explicit training loop.

batch → (x0, σ, ε) → family.predict → loss → backward (accumulate) → clip → optimizer / scheduler step → EMA →
metrics → checkpoint → validation. Building the run (model, data, loss, resume) is `train.run.build_run`; model
specifics stay in the family. Everything random in a step comes from a generator seeded by
(seed, step, micro, rank), so resume is exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowtrain.config import FlowtrainConfig
from flowtrain.data.loader import close_batches
from flowtrain.gc_pause import loading
from flowtrain.track import finish_tracking
from flowtrain.track.stats import TrainMeter
from flowtrain.train import checkpoint as ckpt
from flowtrain.train import engines, faults
from flowtrain.train.control import NonFiniteGuard, SaveClock, StopSignals, agree, determinism, nonfinite_flag
from flowtrain.train.engines import fsdp
from flowtrain.train.errors import CheckpointWriteError
from flowtrain.train.failures import one_failure_stops_all
from flowtrain.train.resume import essentials
from flowtrain.train.run import Run, build_run
from flowtrain.train.state import DataPosition, TrainState
from flowtrain.train.step import draws_for, make_inputs, step_loss, step_seed
from flowtrain.train.trainable import trainable_state

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged mean loss by step (this process's view)
    transformer: torch.nn.Module | None = None  # unwrapped, trained
    interrupted: str | None = None  # the signal (e.g. "SIGTERM") that stopped the run after a checkpoint, if any
    ended: str | None = None  # a pipeline stage's end condition that ended it before max_steps (train.stages)


def train(cfg: FlowtrainConfig, *, resume: str | None = None, progress: bool = True, stage: Any = None) -> TrainResult:
    """Run training to `cfg.train.max_steps`, resuming from `resume` ('latest' or a checkpoint path) if given.

    A first SIGTERM / SIGINT finishes the current step, writes a checkpoint and returns with `interrupted` set (the
    CLI exits with EXIT_INTERRUPTED); a second one aborts at once. Raises `NonFiniteLossError` /
    `CheckpointWriteError` (see `flowtrain.train.errors`) when the run cannot go on; the last checkpoint is intact.
    Under DDP, an exception on one process stops all of them (`flowtrain.train.failures`). `stage`: the pipeline
    stage this run is (`flowtrain.train.stages` runs pipelines).
    """
    with (
        StopSignals() as stop,
        determinism(cfg.train.deterministic),
        contextlib.ExitStack() as cleanup,
        # innermost: a failing process leaves the process group before any other cleanup runs
        one_failure_stops_all(Path(cfg.output_dir), cfg.train.collective_timeout_minutes),
    ):
        with loading():  # model, adapters, optimizer, data: no collector walks while they are built
            run = build_run(cfg, resume, cleanup, stage)
        return run_loop(run, stop, progress)


def run_loop(run: Run, stop: StopSignals, progress: bool = True) -> TrainResult:
    cfg, accelerator, model, family = run.cfg, run.accelerator, run.model, run.family
    device, out = run.device, run.out
    result = TrainResult(output_dir=out, step=run.start_step)
    ga, consumed = cfg.train.gradient_accumulation_steps, 0
    bar = tqdm(total=cfg.train.max_steps, initial=run.start_step, desc="train", unit="step",
               disable=not (progress and run.is_main), dynamic_ncols=True)  # fmt: skip
    # The logged loss is a mean over the steps since the last log; a checkpoint carries the partial sum, so a
    # resumed run logs exactly what an uninterrupted one would even when log_every and the save steps differ.
    loop_state = (run.restored or {}).get("loop") or {}
    meter = TrainMeter(device, samples_per_step=cfg.train.batch_size * ga * run.world)
    steps_acc = loop_state.get("steps_acc", 0)
    # None while the window is empty: its first loss is taken as is (0 + x == x: the same bits, one op fewer).
    loss_acc = torch.tensor(loop_state["loss_acc"], device=device) if steps_acc else None
    reduce = _mean_over_processes(accelerator)
    policy = engines.nonfinite_policy(accelerator, cfg.train.nonfinite)
    guard = NonFiniteGuard(policy, cfg.train.max_nonfinite_in_a_row,
                           **(run.restored_state.nonfinite if run.restored_state else {}))  # fmt: skip
    clock = SaveClock(cfg.checkpoint.every_minutes)
    # fp16: a GradScaler skips overflowing updates itself (and must see every step), so only the loss is checked.
    check_grads = accelerator.scaler is None
    # A pipeline stage may end early on its smoothed loss (train.stages); its state is checkpointed with the loop's.
    end = run.stage.end if run.stage is not None and run.stage.end.active else None
    if end is not None:
        end.load_state_dict(loop_state.get("stage_end"))
    last_step = cfg.train.max_steps
    if end is not None and end.ended:  # resumed from the checkpoint the stage ended at: nothing left to train
        last_step, result.ended = run.start_step, end.reason
    halt: Exception | None = None
    ema_weights = run.ema.swap_factory(engines.unwrap(accelerator, model)) if run.ema is not None else None
    with meter.paused():  # the base model's images, when validation.at_start
        run.validator.maybe_run(run.start_step, accelerator, model, run.tracker, start=True, weights=ema_weights)
    for step in range(run.start_step, last_step):
        if not model.training:  # validation restores the mode itself; a full .train() walk costs ~0.5 ms a step
            model.train()
        faults.at_step(accelerator.process_index, step + 1)  # test hook (train.faults); a no-op unless set
        step_acc, rows = None, []
        for micro in range(ga):
            batch = meter.next_batch(run.batches)
            consumed += 1
            rows += batch["index"].tolist()
            # `global` draws: one stream (rank 0's) for the global micro-batch, each process keeps its rows
            draw_rank, part = draws_for(cfg.train.random_draws, batch, accelerator.process_index, run.world)
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, micro, draw_rank))
            inputs = make_inputs(batch, cfg, family, run.norm, run.empty, gen, device, part=part)
            sync = engines.micro_batch(accelerator, model, last=micro == ga - 1)
            with sync:
                with run.autocast():
                    loss, logs = step_loss(model, family, inputs, run.loss_fn)
                # Outside autocast (torch's advice; same numerics): leaving it frees autocast's cache of low-precision
                # weight copies, which would otherwise live through backward (~2 bytes a parameter, full fine-tune).
                # x / 1 == x: with one micro-batch a step, no division (one op and one autograd node fewer)
                micro_loss = loss / ga if ga > 1 else loss
                run.backward(micro_loss)
            step_acc = micro_loss.detach() if step_acc is None else step_acc + micro_loss.detach()
            meter.add(inputs.sigma, logs)
        max_norm = cfg.train.max_grad_norm
        grad_norm = run.clip_grad_norm(run.params, max_norm) if max_norm else None
        grad_norm = fsdp.whole(grad_norm)  # FSDP: the norm comes back as a DTensor
        done = step + 1
        # One host sync per step, agreed by all processes: skip this update? stop? time for a save?
        bad, stop_now, time_due = agree(
            accelerator,
            [nonfinite_flag(step_acc, grad_norm if check_grads else None), stop.requested is not None, clock.due()],
        )
        halt = guard.update(bad, done, rows, lambda: _latest_name(out))
        if halt is not None:
            run.optimizer.zero_grad(set_to_none=True)
            break
        if not bad or not check_grads:
            run.hot_optimizer.step()
        run.lr_scheduler.step()  # a skipped step still advances the schedule: lr stays a function of the step
        run.hot_optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            with engines.full_parameters(accelerator, model, trainable_only=True):  # ZeRO-3: gathered meanwhile
                run.ema.update(done)
        if not bad:
            loss_acc, steps_acc = step_acc if loss_acc is None else loss_acc + step_acc, steps_acc + 1
        meter.end_step(ok=not bad)
        bar.update(1)

        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            # The loss is accumulated on device between logged steps.
            if loss_acc is None:
                mean = torch.full((), float("nan"), device=device)
            else:
                mean = loss_acc / steps_acc if steps_acc > 1 else loss_acc
            lr, epoch = run.lr_scheduler.get_last_lr()[0], run.sampler.position_after(consumed)[0]
            row = meter.row(mean, grad_norm, reduce=reduce, lr=lr, epoch=epoch)
            row["nonfinite_skipped"] = guard.total
            result.losses[done] = row["loss"]
            if end is not None and end.observe(done, row["loss"]):
                result.ended = end.reason
            if end is not None and end.value is not None:
                row["loss_smoothed"] = end.value
            if hasattr(run.lr_scheduler, "observe"):  # lr_scheduler plateau: on the (process-averaged) logged loss
                run.lr_scheduler.observe(row["loss"])
            run.tracker.log_metrics(done, row)
            if not bar.disable:
                bar.set_postfix_str(meter.postfix(row))
            loss_acc, steps_acc = None, 0

        every = cfg.checkpoint.every_steps
        due = bool(every and done % every == 0) or time_due or stop_now
        # A stop there (or a stage's early end) promises a checkpoint to resume (and export) from.
        if done == cfg.train.max_steps or result.ended:
            due = cfg.checkpoint.final or stop_now
        if due:
            try:
                save_checkpoint(run, done, run.sampler.position_after(consumed), guard,
                                loop={"loss_acc": 0.0 if loss_acc is None else loss_acc.item(), "steps_acc": steps_acc,
                                      **({"stage_end": end.state_dict()} if end is not None else {})})  # fmt: skip
            except CheckpointWriteError as e:
                halt = e
                break
            clock.saved()
            run.tracker.flush()  # every row up to a checkpoint is recorded before training goes on from it
        result.step = done
        if result.ended:
            break
        if stop_now:
            result.interrupted = stop.name or "signal"
            if run.is_main:
                log.warning("stopped by %s at step %d; checkpoint-%d written. Continue with --resume_from_checkpoint "
                            "latest", result.interrupted, done, done)  # fmt: skip
            break
        with meter.paused():  # sampling time is not step time
            run.validator.maybe_run(done, accelerator, model, run.tracker, weights=ema_weights)
    bar.close()
    close_batches(run.batches)
    if halt is not None:
        run.tracker.close("FAILED")
        accelerator.end_training()
        raise halt
    return _finish(run, result)


def _finish(run: Run, result: TrainResult) -> TrainResult:
    """Export the final weights (EMA weights when EMA is on), graphs and artifacts; end the run."""
    unwrapped = engines.unwrap(run.accelerator, run.model)
    weights = None
    if not result.interrupted:
        # Sharded weights are gathered on every process (a collective) for the main process to write them: ZeRO-3's
        # in place (`engines.full_parameters`), FSDP's into a view of the model (`sharding.full_weights`).
        split = fsdp.sharded(run.accelerator)
        with engines.full_parameters(run.accelerator, run.model, trainable_only=run.lora_cfg is not None):
            if run.is_main or split:
                with (
                    run.ema.swapped_in(unwrapped) if run.ema is not None else contextlib.nullcontext(),
                    fsdp.full_weights(run.accelerator, unwrapped, trainable_only=run.lora_cfg is not None) as full,
                ):
                    if run.is_main:
                        weights = export_weights(run, full)
    # graphs/ + final artifacts; an interrupted run is KILLED in MLflow until a resume continues it
    cfg = run.cfg
    finish_tracking(run.tracker, run.out, weights, log_weights=cfg.tracking.log_weights, graphs=cfg.tracking.graphs,
                    status="KILLED" if result.interrupted else "FINISHED")  # fmt: skip
    run.accelerator.wait_for_everyone()
    result.transformer = unwrapped
    run.accelerator.end_training()
    return result


def _latest_name(out: Path) -> str | None:
    ckpts = ckpt.list_checkpoints(out)
    return str(ckpts[-1][1]) if ckpts else None


def _mean_over_processes(accelerator) -> Any:
    """`reduce` for the metrics row: the mean over processes (a collective); None with one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t, reduction="mean")


def _agree_failed(accelerator) -> object:
    """`sync` for write_checkpoint: an all-reduce that doubles as the barrier between its phases."""
    if accelerator.num_processes == 1:
        return lambda failed: failed
    return lambda failed: agree(accelerator, [failed])[0]


def save_checkpoint(run: Run, step: int, position: tuple[int, int], guard: NonFiniteGuard, loop: dict) -> None:
    """checkpoint-{step}: the trainable weights, optimizer, schedule, RNG of every rank, the data position and the
    loop's partial log window; with a LoRA also its diffusers file (holding the EMA weights when EMA is on, like
    the export). Then old checkpoints are pruned."""
    cfg, accelerator = run.cfg, run.accelerator
    unwrapped = engines.unwrap(accelerator, run.model)
    state = TrainState(
        step=step,
        data=DataPosition(epoch=position[0], batch=position[1], seed=cfg.train.seed),
        essentials=essentials(cfg, run.dataset.manifest.fingerprint["id"], run.transformer_id),
        learning_rate=cfg.train.learning_rate,
        max_steps=cfg.train.max_steps,
        world_size=run.world,
        global_batch=cfg.train.batch_size * run.world,
        nonfinite=guard.state(),
    )
    extra = None
    split = fsdp.sharded(accelerator)
    if run.lora_cfg is not None and split:
        # The LoRA file needs the gathered LoRA weights: a collective, so here on every process (never the base).
        with run.ema.swapped_in(unwrapped) if run.ema is not None else contextlib.nullcontext():
            lora = fsdp.gather_weights(unwrapped, trainable_only=True)

        def extra(d: Path) -> None:
            with fsdp.state_dict_view(unwrapped, lora):
                run.family.save_lora(d, unwrapped, run.lora_cfg)

    elif run.lora_cfg is not None:

        def extra(d: Path) -> None:
            with run.ema.swapped_in(unwrapped) if run.ema is not None else contextlib.nullcontext():
                run.family.save_lora(d, unwrapped, run.lora_cfg)

    ema = run.ema.state_dict() if run.ema is not None else None
    payload = state.to_json()
    del payload["step"]  # write_checkpoint records the step itself
    # A sharding engine writes the weights and optimizer state itself, one shard per process (a collective): FSDP
    # through torch.distributed.checkpoint (its EMA too), DeepSpeed its own checkpoint.
    engine_writes = split or engines.engine_checkpoint(accelerator)

    def rank_files(d: Path) -> None:
        if split:
            fsdp.save_shards(d, unwrapped, run.optimizer, ema)
        else:
            engines.save_shards(accelerator, run.model, d, lora=run.lora_cfg is not None)

    with engines.full_parameters(accelerator, run.model, trainable_only=True):  # ZeRO-3: the LoRA file's adapters
        ckpt.write_checkpoint(
            run.out,
            step,
            trainable=None if engine_writes else trainable_state(unwrapped),
            optimizer=None if engine_writes else run.optimizer,
            lr_scheduler=run.lr_scheduler,
            state=payload,
            rank=accelerator.process_index,
            is_main=run.is_main,
            sync=_agree_failed(accelerator),
            extra_files=extra,
            scaler=accelerator.scaler,
            rank_state=loop,
            ema=None if split else ema,
            rank_files=rank_files if engine_writes else None,
        )
    if run.is_main:
        ckpt.prune_checkpoints(run.out, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)


def export_weights(run: Run, transformer: torch.nn.Module) -> Path:
    """Final artefacts: the LoRA file (diffusers format) or a `transformer/` diffusers folder. Written under a
    temporary name and moved into place, so a kill mid-export never leaves a truncated file under the final name
    (the final checkpoint is complete by then; resuming from it exports again)."""
    out = run.out
    tmp = out / ".export.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if run.lora_cfg is not None:
        name = run.family.save_lora(tmp, transformer, run.lora_cfg).name
    else:
        name = run.family.save_full(tmp, transformer).name
    path = out / name
    if path.is_dir():  # a folder cannot be replaced atomically: move the old one aside first
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        (tmp / name).rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp / name, path)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s", path)
    if run.cfg.export.formats:  # `export.formats`: the same final weights in other tools' layouts
        from flowtrain.export import export_run

        export_run(out, run.cfg.export.formats, run.cfg.model.family)
    return path
