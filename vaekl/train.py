"""Training: `train_and_evaluate(config, workdir)`, the call every entry point shares.

The step and the epoch are `vaekl.steps`' pure functions: an epoch is one jitted
device call with the state donated, and its randomness is folded from the step and
epoch numbers, so a resumed run draws exactly the numbers an uninterrupted one
would: on CPU its final parameters are bitwise equal.

`config.train.num_seeds > 1` trains that many seeds (seed, seed + 1, ...)
in one program: with `jax.vmap` on accelerators, one seed after another
(`lax.map`) on CPUs, where that is faster.

With several devices, of this process or of several (`vaekl.distributed`), the
batch is sharded over all of them (one global mesh) and the parameters are
replicated. Every process holds the whole (small) training set on each of its
devices, and computes the same permutation, so each device gathers only its own
rows of each batch inside the jitted epoch: no data cross between processes, only
the gradients' all-reduce. Evaluation batches are sharded the same way. Process 0
alone writes the workdir's files; all processes save and restore the checkpoints
(orbax's multi-process protocol).
"""

import dataclasses
import json
import signal
import time

import jax
import numpy as np
import optax
from absl import logging

from vaekl import checkpoint, distributed, evaluate, interrupt, logs, models, validate
from vaekl import config as config_lib
from vaekl import progress as progress_lib
from vaekl import steps as steps_lib
from vaekl import workdir as workdir_lib


class TrainingDiverged(RuntimeError):
    """A non-finite loss or metric stopped training (the last good checkpoint is kept)."""


def create_model(config, train_data) -> models.VAE:
    """The VAE that `config.model` describes, sized for `train_data`.

    Every field of config.model is passed on under its own name: a new VAE attribute
    needs only its default in vaekl/config.py. Two names differ from Flax's: `init` is
    the VAE's `init_scheme` (a Module's `init` is a method), and `likelihood` "" takes
    the data set's.
    """
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v
              for k, v in config.model.items()}
    fields["init_scheme"] = fields.pop("init")
    fields["likelihood"] = fields["likelihood"] or train_data.likelihood
    return models.VAE(**fields, data_dim=train_data.dim, image_shape=tuple(train_data.shape))


OPTIMIZERS = ("adam", "adamw", "sgd")  # config.optim.optimizer's names.
SCHEDULES = ("constant", "cosine", "warmup_cosine", "iwae", "jang")  # config.optim.schedule's.
ON_NAN = ("stop", "skip")  # config.train.on_nan's: what a non-finite loss does.


def check_optim_config(config) -> None:
    """Raises one error naming the first bad field of `config.optim` (called by
    `vaekl.config.check`, before any data loads).

    Raises:
      ValueError: `config.optim.<field>: ...`.
    """
    for field, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        validate.config_choice(config, f"optim.{field}", allowed)
    if not config.optim.learning_rate > 0:
        raise ValueError("config.optim.learning_rate: expected > 0, got"
                         f" {config.optim.learning_rate!r}.")


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Optax optimiser of `config.optim`, with the learning-rate schedule of its `schedule`."""
    total = config.train.num_epochs * steps_per_epoch
    optim = config.optim
    lr = optim.learning_rate
    if optim.schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, max(total, 1))
    elif optim.schedule == "warmup_cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, optim.warmup_steps, max(total, optim.warmup_steps + 1))
    elif optim.schedule == "jang":  # Jang et al. (2017): x 0.9 every 1000 steps.
        schedule = optax.exponential_decay(lr, transition_steps=1000, decay_rate=0.9,
                                           staircase=True)
    else:  # "iwae": Burda et al., 3^i epochs at lr * round(10^(-i/7), 1), i = 0..7.
        boundaries, values, epoch = [], [lr], 0
        for i in range(8):
            epoch += 3**i
            boundaries.append(epoch * steps_per_epoch)
            values.append(lr * round(10 ** (-(i + 1) / 7), 1))
        schedule = optax.piecewise_constant_schedule(
            lr, {b: values[i + 1] / values[i] for i, b in enumerate(boundaries[:-1])})
    if optim.optimizer == "sgd":
        return optax.sgd(schedule, momentum=optim.momentum or None)
    opt = optax.adamw if optim.optimizer == "adamw" else optax.adam
    kwargs = {"weight_decay": optim.weight_decay} if optim.optimizer == "adamw" else {}
    return opt(schedule, b1=optim.adam_b1, b2=optim.adam_b2, eps=optim.adam_eps, **kwargs)


def _objective_name(config) -> str:
    """How plot titles name the training objective, e.g. "kl=analytic" or "iwae K=5, dreg"."""
    loss = config.loss
    if loss.objective == "elbo":
        return f"kl={loss.kl}" + (f", K={loss.num_samples}" if loss.num_samples > 1 else "")
    return f"{loss.objective} K={loss.num_samples}, {loss.grad_estimator}"


def load_data(config):
    """(train, test) `vaekl.data.Dataset`s for `config.data.dataset`; the test split cut to
    its first `config.eval.eval_examples` examples when that is set."""
    from vaekl import data  # Lazy: the data module reaches for tensorflow-datasets.

    d = config.data
    kwargs = dict(data_dir=d.data_dir, path=d.data_path or None, seed=d.data_seed,
                  **dict(d.data_options))
    train, test = (data.load(d.dataset, split, **kwargs) for split in ("train", "test"))
    num = config.eval.eval_examples
    if num > len(test):
        raise ValueError(f"config.eval.eval_examples: {num} is more than the {len(test)} test"
                         f" examples of {d.dataset!r} (0 evaluates them all).")
    if num:
        test = dataclasses.replace(test, x=test.x[:num],
                                   labels=None if test.labels is None else test.labels[:num])
    return train, test


def check_train_config(config, *, num_devices: int) -> None:
    """Raises one error naming the first bad field of `config.train` (called by
    `vaekl.config.check`, before any data loads): its names and counts, and a batch that
    splits over the `num_devices` (`train_and_evaluate` refuses one larger than the
    training split, once it is loaded).

    Raises:
      ValueError (TypeError for a count that is no int): `config.train.<field> ...`.
    """
    validate.config_choice(config, "train.on_nan", ON_NAN)
    for field, minimum in (("batch_size", 1), ("num_seeds", 1), ("num_epochs", 0)):
        validate.config_int(config, f"train.{field}", minimum=minimum)
    if config.train.batch_size % num_devices:
        raise ValueError(f"config.train.batch_size: {config.train.batch_size} must be divisible"
                         f" by the {num_devices} devices it is sharded over.")


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains the VAE of `config`, evaluates it, and writes everything to `workdir`.

    Rerunning with the same workdir resumes from the latest checkpoint. Under
    `jax.distributed` every process calls this with the same arguments.

    Writes `config.json`, `metrics.jsonl` (train and eval scalars by step) and the
    same scalars as TensorBoard event files in `tensorboard/`, `results.json` (final
    figures), `per_example.npz` (the final evaluation's figures per test example, for
    paired comparisons of runs), `checkpoints/` (orbax), `learning_curve.png`, and PNG grids of
    reconstructions and samples for image data (in TensorBoard too).

    SIGINT or SIGTERM stops it after the epoch in flight (or between evaluation
    batches) with a checkpoint of the last completed epoch, raising
    `interrupt.Interrupted`; a second SIGINT ends the process at once. One that comes
    after the final evaluation lets the run finish its writes and return. Under
    `jax.distributed` a signal to any process stops them all at the same point.

    Returns:
      The results dict written to results.json.
    """
    logs.show_info()  # Progress lines in a notebook too, where no absl app set up logging.
    config = config_lib.complete(config)  # A partial config takes the defaults' other fields.
    start_time = time.time()
    devices, primary = jax.devices(), distributed.is_primary()
    config_lib.check(config, num_devices=len(devices))
    workdir_lib.prepare_workdir(workdir)  # An unusable workdir fails before the data loads.
    train_data, test_data = load_data(config)
    if config.train.batch_size > len(train_data):
        raise ValueError(f"config.train.batch_size: {config.train.batch_size} is larger than the"
                         f" {len(train_data)} training examples of {config.data.dataset!r}.")
    # Checked now, written once the checkpoint is known to fit the config: a config its data
    # refuse, or one with fewer epochs than the workdir's run has trained, leaves config.json
    # as it was (the one that describes the run's results).
    work = workdir_lib.prepare(workdir, config, write=False)
    model = create_model(config, train_data)
    steps_per_epoch = len(train_data) // config.train.batch_size
    num_epochs, seed = config.train.num_epochs, config.train.seed
    total_steps = num_epochs * steps_per_epoch
    tx = create_optimizer(config, steps_per_epoch)
    mesh = distributed.data_mesh()
    train_x = jax.device_put(train_data.x, distributed.replicated(mesh))
    num_seeds = config.train.num_seeds
    keys, init, epoch_step = steps_lib.training_fns(model, config, tx, data_dim=train_data.dim,
                                          steps_per_epoch=steps_per_epoch,
                                          binarize=train_data.dynamic_binarization, mesh=mesh)
    state = init(keys)

    ckpt = checkpoint.Checkpointer(work / "checkpoints", max_to_keep=config.train.keep_checkpoints)
    step, state = ckpt.restore_latest(state)  # Sharded like the template: replicated.
    if step is not None and step > total_steps:
        ckpt.close()
        raise ValueError(
            f"config.train.num_epochs: {workdir!r} holds a run trained for"
            f" {step // steps_per_epoch} epochs (its checkpoint is at step {step}), more than"
            f" the {num_epochs}"
            " asked; a run cannot be resumed backwards: ask for at least as many epochs, or"
            " choose a new --workdir.")
    if primary:
        workdir_lib.write_config(work, config)
    if step is not None:
        logging.info("Resumed from the checkpoint at step %d.", step)
    step = step or 0
    writer = workdir_lib.MetricWriter(
        work, resume_step=step, redo_eval=step == total_steps, enabled=primary,
        seeds=range(seed, seed + num_seeds) if num_seeds > 1 else None)
    num_params = sum(x.size for x in jax.tree.leaves(state.params)) // num_seeds
    logging.info("%s: %d parameters per seed, %d steps per epoch, %d epochs, %d seed(s).",
                 config.data.dataset, num_params, steps_per_epoch, num_epochs, num_seeds)

    evaluator = evaluate.Evaluator(model, config, test_data, keys, vmapped=num_seeds > 1,
                                   mesh=mesh)
    train_wall = workdir_lib.read_train_wall(work)
    first_epoch = step // steps_per_epoch

    def save():
        ckpt.save(step, state)
        if primary:
            workdir_lib.write_train_wall(work, train_wall)
        writer.flush()

    def stop_if_signalled():
        """After SIGINT or SIGTERM: a checkpoint of `step` (unless there is one), Interrupted.

        The processes of a run stop together, on the signal any of them got (the save is
        a collective): each calls this at the same points.
        """
        signum = distributed.shared_signal(stop.signum)
        if signum is not None:
            if step and step not in ckpt.steps():
                save()
            raise interrupt.Interrupted(step, signum)

    # Signals stay deferred to the end: one that comes after the final evaluation lets the
    # run finish its writes (its work is done) instead of ending it halfway through them.
    with interrupt.deferred_signals() as stop:
        try:
            if first_epoch < num_epochs:
                train_wall += _compile(epoch_step, state, keys, first_epoch, train_x)
                stop_if_signalled()
            progress = progress_lib.Progress("train", total_steps, unit="steps", done=step,
                                             first_is_warmup=False)
            last_save = time.time()
            for epoch in range(first_epoch, num_epochs):
                t0 = time.time()
                state, metrics = epoch_step(state, keys, epoch, train_x)
                metrics = jax.tree.map(np.asarray, metrics)  # The one host sync of the epoch.
                t1 = time.time()
                train_wall += t1 - t0
                step = (epoch + 1) * steps_per_epoch
                _check_finite(metrics, epoch * steps_per_epoch, config, ckpt)
                writer.write_train(metrics, first_step=epoch * steps_per_epoch + 1,
                                   every=config.train.log_every_steps, at_step=("grad_norm",),
                                   start_time=t0, end_time=t1)
                eval_every = config.eval.eval_every_epochs
                if eval_every and (epoch + 1) % eval_every == 0 and epoch + 1 < num_epochs:
                    writer.write_scalars(step, evaluator.summary(
                        state.params, importance_samples=config.eval.eval_importance_samples_during,
                        stop=stop_if_signalled), split="eval")
                every = config.train.checkpoint_every_epochs
                if (every and (epoch + 1) % every == 0) or epoch + 1 == num_epochs \
                        or distributed.agree(time.time() - last_save >=
                                             config.train.checkpoint_every_secs):
                    save()
                    last_save = time.time()
                progress.advance(steps_per_epoch, loss=float(np.mean(metrics["loss"])))
                stop_if_signalled()
            per_example = evaluator.per_example(state.params, config.eval.eval_importance_samples,
                                                stop=stop_if_signalled)
            summary = evaluate.summarize(per_example)
            writer.write_scalars(step, summary, split="eval")
            results = evaluator.results(summary, num_seeds)
            results.update(num_params=int(num_params), steps=int(step), train_wall_s=train_wall,
                           total_wall_s=time.time() - start_time, steps_per_epoch=steps_per_epoch,
                           dataset=config.data.dataset, kl=config.loss.kl,
                           num_samples=config.loss.num_samples, objective=config.loss.objective,
                           grad_estimator=config.loss.grad_estimator,
                           outer_samples=config.loss.outer_samples, seed=seed,
                           num_seeds=num_seeds, devices=len(devices),
                           processes=jax.process_count(), platform=devices[0].platform)
            if primary:
                workdir_lib.write_per_example(work, per_example)
                workdir_lib.write_results(work, results)
                if len(train_data.shape) == 3:  # On this process's device, from a host copy.
                    writer.write_images(step, evaluator.write_images(
                        work, jax.device_get(state.params), keys, epoch=step // steps_per_epoch,
                        step=step, test_elbo=summary["test_elbo"]))
        finally:
            ckpt.close()
            writer.close()
        if primary:
            evaluate.write_learning_curve(
                workdir_lib.read_metrics(work / "metrics.jsonl"), work / "learning_curve.png",
                title=f"{config.data.dataset}, {_objective_name(config)}, {num_epochs} epochs")
        if stop.signum is not None:
            logging.warning("%s came after the final evaluation: the run finished.",
                            signal.Signals(stop.signum).name)
    logging.info("Results: %s", json.dumps({k: v for k, v in results.items()
                                            if not isinstance(v, (list, dict))}))
    return results


def _compile(epoch_step, *args) -> float:
    """Compiles the epoch before its first call, with a line first; returns the seconds.

    Compiled apart, the first epoch's time, the rate and the time left are those of
    training alone; the jitted function then reuses the executable.
    """
    logging.info("train: compiling the epoch ...")
    start = time.time()
    epoch_step.lower(*args).compile()
    seconds = time.time() - start
    logging.info("train: compiled in %s.", progress_lib.format_duration(seconds))
    return seconds


def _check_finite(metrics: dict, first_step: int, config, ckpt):
    """Raises `TrainingDiverged` at the first non-finite step, unless steps are skipped."""
    if config.train.on_nan == "skip":
        skipped = int(np.sum(metrics["skipped"]))
        if skipped:
            logging.warning("Skipped %d steps with a non-finite loss or gradient.", skipped)
        return
    names = ("loss", "elbo", "rate", "distortion", "grad_norm")
    # The earliest bad step of any metric (grad_norm is 0 at the steps where it is not computed).
    bad = {name: np.argwhere(~np.isfinite(metrics[name])) for name in names}
    first = min((int(w[:, -1].min()) for w in bad.values() if len(w)), default=None)
    if first is None:
        return
    culprits = []
    for name, where in bad.items():
        at_first = where[where[:, -1] == first]
        if len(at_first):
            culprits.append(f"{name!r} is {metrics[name][tuple(at_first[0])]}")
    kept = ckpt.steps()
    raise TrainingDiverged(
        f"Training diverged at step {first_step + first + 1}:"
        f" metric{'s' if len(culprits) > 1 else ''} {', '.join(culprits)}."
        f" The last good checkpoint ({'step ' + str(kept[-1]) if kept else 'none'})"
        " is kept; lower config.optim.learning_rate, or set config.train.on_nan='skip' to skip"
        " such steps.")
