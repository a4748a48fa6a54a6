"""vaekl against its peer and against the machine's own limits, in one process.

  python -m benchmarks.benchmark --out=DIR [--quick] [--data_dir=TFDS_DIR] [--sections=...]

Run from the root of a checkout: it times the `vaekl` and `experiments` of that
checkout (its subprocesses run there too). Writes DIR/benchmark.json and
DIR/benchmark.md. Each timing is repeated (`--repeats`) and reported as
min / median / max; ratios use medians and are > 1 when vaekl is faster, unless
the key says otherwise. `--quick` shrinks every measurement (tests run it for
correctness only; its numbers mean nothing). benchmarks/README.md says what
each key measures.

The model is the Flax example's: 784-500-20 ReLU MLP encoder and decoder,
Bernoulli likelihood, analytic KL, batch 128, Adam 1e-3. Of vaekl it calls only
`train.create_optimizer`, `vaekl.steps.training_fns`, `models.VAE` and `bounds.iwae`
(with the `flax` preset of experiments/configs/train.py, and `experiments.main`
as a command), so that one script times trees before and after a change.
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks import burda

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_bool("quick", False, "Tiny sizes: a correctness check, not a measurement.")
flags.DEFINE_integer("repeats", 5, "Repeats of each timing.")
flags.DEFINE_string("data_dir", None, "tfds data_dir with binarized_mnist prepared (for"
                    " the 'elbo' section, which is skipped without it).")
flags.DEFINE_integer("iwae_images", 1000, "Test images for the IWAE-5000 measurement.")
SECTIONS = ("import", "step", "torch", "vmap8", "iwae", "elbo", "burda")
flags.DEFINE_list("sections", list(SECTIONS), f"Which measurements to run, of {SECTIONS}"
                  " ('step' also gives compile_s and the matmul chain; 'torch' (it needs"
                  " PyTorch), 'vmap8' and 'iwae' run it too; 'burda' is the study's net,"
                  " benchmarks/burda.py).")
flags.mark_flag_as_required("out")

REPO = Path(__file__).resolve().parents[1]
BATCH, DIM, HIDDEN, LATENTS = 128, 784, 500, 20
PAUSE_S = 0.5  # Between interleaved contenders (longer than OpenMP's 200 ms spin-wait).
# The Flax example's model, batch and Adam, with PyTorch's initialisation and a cosine decay
# from 2e-3 (instead of a constant 1e-3): the same 10 epochs end about 2 nats higher.
TIME_TO_ELBO_OVERRIDES = ("--config.model.init=torch", "--config.optim.learning_rate=2e-3",
                          "--config.optim.schedule=cosine")


def _timeit(fns: dict, repeats: int) -> dict:
    """Calls each of `fns` `repeats` times, interleaved; name -> its `repeats` seconds.

    Interleaving gives every contender the same share of the machine's slow
    moments (on a shared 2-core VM a peer timed a minute later can differ by 40%);
    on CPU a pause before each call lets the previous contender's thread pools
    (OpenMP, XLA) stop spinning, so no call starts on a busy machine (on a GPU a
    pause would let the clocks drop instead).
    """
    import jax

    pause = PAUSE_S if len(fns) > 1 and jax.default_backend() == "cpu" else 0.0
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _stats(times, per=1):
    """min, median (the upper middle one) and max of the seconds `times`, each over `per`."""
    lo, med, hi = (t / per for t in (min(times), sorted(times)[len(times) // 2], max(times)))
    return {"min": lo, "median": med, "max": hi}


def _python(code: str, *args) -> str:
    """The last line that `python -c code args` prints (this interpreter, run in REPO)."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, cwd=REPO, check=True)
    return out.stdout.strip().splitlines()[-1]


def _train_config(num_seeds=1):
    from experiments.configs import train as train_config

    config = train_config.get_config("flax")
    config.train.num_seeds = num_seeds
    return config


def _fake_binary_data(n, seed=0):
    return burda.fake_binary_data(n, DIM, seed)


def vaekl_epoch(steps, num_seeds=1, vmap_seeds=None):
    """(run, first-call seconds): run() is one epoch of `steps` vaekl train steps (all seeds).

    Several seeds run as training runs them (`vmap_seeds=None`: vmapped, mapped on CPU)
    or, with `vmap_seeds` True or False, vmapped or mapped.
    """
    import jax
    import jax.numpy as jnp

    from vaekl import models, train
    from vaekl import steps as steps_lib

    config = _train_config(num_seeds=num_seeds)
    model = models.VAE(latents=LATENTS, data_dim=DIM, hidden=(HIDDEN,))
    tx = train.create_optimizer(config, steps)
    x = jnp.asarray(_fake_binary_data(steps * BATCH))
    keys, init, step = steps_lib.training_fns(model, config, tx, data_dim=DIM, steps_per_epoch=steps,
                                          binarize=False, vmap_seeds=vmap_seeds)
    state = init(keys)
    t0 = time.perf_counter()
    state, _ = step(state, keys, 0, x)
    jax.block_until_ready(state)
    first_call = time.perf_counter() - t0
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], keys, 1, x)
        jax.block_until_ready(metrics)

    return run, first_call


def matmul_chain(steps):
    """(run, FLOPs per step): run() is `steps` steps' matmuls (forward + backward), one jit."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(0), 8)
    w = [jax.random.normal(k[0], (DIM, HIDDEN)), jax.random.normal(k[1], (HIDDEN, 2 * LATENTS)),
         jax.random.normal(k[2], (LATENTS, HIDDEN)), jax.random.normal(k[3], (HIDDEN, DIM))]
    x = jax.random.normal(k[4], (steps, BATCH, DIM))

    def one(carry, xb):
        # Forward: the four layers' matmuls.
        h1 = xb @ w[0] + carry
        o1 = h1 @ w[1]
        z = o1[:, :LATENTS]
        h2 = z @ w[2]
        o2 = h2 @ w[3]
        # Backward: for each layer the weight gradient X^T dY, and dX = dY W^T
        # except at the input layer.
        g4 = h2.T @ o2
        d2 = o2 @ w[3].T
        g3 = z.T @ d2
        dz = d2 @ w[2].T
        do1 = jnp.concatenate([dz, dz], axis=1)
        g2 = h1.T @ do1
        dh1 = do1 @ w[1].T
        g1 = xb.T @ dh1
        return 1e-3 * (g1.sum() + g2.sum() + g3.sum() + g4.sum()), None

    f = jax.jit(lambda x: jax.lax.scan(one, jnp.zeros(()), x)[0])
    f(x).block_until_ready()
    flops = 2 * BATCH * (DIM * HIDDEN + HIDDEN * 2 * LATENTS + LATENTS * HIDDEN
                         + HIDDEN * DIM) * 3 - 2 * BATCH * DIM * HIDDEN
    return lambda: f(x).block_until_ready(), flops


def torch_epoch(steps, compiled):
    """run() is `steps` steps of the equivalent PyTorch training step (CPU, same threads)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    class VAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.e2 = torch.nn.Linear(DIM, HIDDEN), torch.nn.Linear(HIDDEN, 2 * LATENTS)
            self.d1, self.d2 = torch.nn.Linear(LATENTS, HIDDEN), torch.nn.Linear(HIDDEN, DIM)

        def forward(self, x):
            mean, log_var = self.e2(F.relu(self.e1(x))).chunk(2, dim=-1)
            z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
            logits = self.d2(F.relu(self.d1(z)))
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = 0.5 * torch.sum(mean.square() + torch.expm1(log_var) - log_var)
            return (rec + kl) / x.shape[0]

    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    data = torch.from_numpy(_fake_binary_data(steps * BATCH)).view(steps, BATCH, DIM)

    return burda.torch_steps(model, opt, data, compiled)


def bench_iwae(images, samples, repeats):
    """IWAE-`samples` over `images` test-like images: seconds, and the model FLOPs done.

    As an evaluation runs it: a Python loop over batches of the train config's
    `eval_batch_size` images, one jitted `bounds.iwae` (`eval_chunk_size` draws at
    a time) per batch, each batch fetched before the next is dispatched.
    """
    import functools

    import jax
    import jax.numpy as jnp

    from vaekl import bounds, models

    config = _train_config()
    model = models.VAE(latents=LATENTS, data_dim=DIM, hidden=(HIDDEN,))
    batch = min(config.eval.eval_batch_size, images)
    num_batches = -(-images // batch)
    x = _fake_binary_data(num_batches * batch, 1).reshape(num_batches, batch, DIM)
    params = model.init(jax.random.key(0), jnp.zeros((1, DIM)), jnp.zeros((1, LATENTS)))
    keys = jax.random.split(jax.random.key(1), num_batches)

    @jax.jit
    def one_batch(params, x, key):
        q = model.apply(params, x, method=models.VAE.encode_posterior)
        log_lik = functools.partial(model.apply, params, x, method=models.VAE.log_likelihood)
        return bounds.iwae(key, q, log_lik, num_samples=samples,
                           chunk_size=config.eval.eval_chunk_size)

    def run():
        for i in range(num_batches):
            np.asarray(one_batch(params, x[i], keys[i]))

    run()  # Compile.
    t = _timeit({"iwae": run}, max(1, repeats // 2))["iwae"]
    # Decoder forward per sample: 2*(20*500 + 500*784) FLOPs.
    flops = num_batches * batch * samples * 2 * (LATENTS * HIDDEN + HIDDEN * DIM)
    return _stats(t), flops


def peak_rss_gb() -> float:
    """This process's peak resident memory since it started its program: /proc's VmHWM
    where it exists (getrusage's ru_maxrss carries the forking process's peak over execve)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _iwae_in_subprocess(images, samples, repeats):
    """bench_iwae in a fresh process, so that its peak RSS is the evaluation's own."""
    code = ("import json, sys; from benchmarks.benchmark import bench_iwae, peak_rss_gb;"
            " t, flops = bench_iwae(*map(int, sys.argv[1:])); print(json.dumps({'seconds': t,"
            " 'gflop_per_s': flops / t['median'] / 1e9, 'peak_rss_gb': peak_rss_gb()}))")
    return {"images": images, "samples": samples,
            **json.loads(_python(code, images, samples, repeats))}


def bench_import(repeats):
    code = "import time; t = time.perf_counter(); import vaekl; print(time.perf_counter() - t)"
    return _stats([float(_python(code)) for _ in range(repeats)])


def bench_time_to_elbo(data_dir, out, target=-103.6):
    """Whole-process wall time of the Flax-example training until test ELBO >= target."""
    workdir = Path(out) / "time_to_elbo_run"
    cmd = [sys.executable, "-m", "experiments.main", "--config=experiments/configs/train.py:flax",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           "--config.eval.eval_every_epochs=1",
           *TIME_TO_ELBO_OVERRIDES]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    total = time.time() - t0
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    first = next((e for e in evals if e["test_elbo"] >= target), None)
    return {"time_to_elbo_s": None if first is None else first["time"] - t0,
            "elbo_after_10_epochs": evals[-1]["test_elbo"], "process_wall_s": total,
            "target_elbo": target, "time_to_elbo_overrides": TIME_TO_ELBO_OVERRIDES}


def main(argv):
    del argv
    sections = set(FLAGS.sections)
    if not sections <= set(SECTIONS):
        raise app.UsageError(f"--sections: expected names from {SECTIONS}, got"
                             f" {sorted(sections - set(SECTIONS))}")
    if sections & {"torch", "vmap8", "iwae"}:
        sections.add("step")
    if sections & {"torch", "burda"}:
        try:
            import torch
        except ImportError as e:
            raise app.UsageError("--sections: 'torch' and 'burda' need PyTorch (pip install -e"
                                 " .[bench]); leave them out to skip the PyTorch peer.") from e
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    quick, repeats = FLAGS.quick, 2 if FLAGS.quick else FLAGS.repeats
    steps = 20 if quick else 390
    import jax

    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
           "cpu_count": os.cpu_count(), "quick": quick, "sections": sorted(sections),
           "jax": jax.__version__, "device": str(jax.devices()[0])}
    if "import" in sections:
        res["import_s"] = bench_import(repeats)
    if "step" in sections:
        # The contenders, timed interleaved (epochs of `steps` steps each).
        vaekl_run, first_call = vaekl_epoch(steps)
        chain_run, flops = matmul_chain(steps)
        runs = {"vaekl": vaekl_run, "chain": chain_run}
        if "torch" in sections:
            res["torch"] = torch.__version__
            runs["torch_eager"] = torch_epoch(steps, compiled=False)
            runs["torch_compile"] = torch_epoch(steps, compiled=True)
        times = {k: _stats(v, steps) for k, v in _timeit(runs, repeats).items()}
        vaekl_step = res["vaekl_step_s"] = times["vaekl"]
        chain = res["matmul_chain_step_s"] = times["chain"]
        # Compilation: the first call less one epoch's run time.
        res["compile_s"] = first_call - steps * vaekl_step["median"]
        res["train_step_vs_matmul"] = chain["median"] / vaekl_step["median"]
        res["step_gflop_per_s"] = flops / vaekl_step["median"] / 1e9
        res["matmul_gflop_per_s"] = flops / chain["median"] / 1e9
        if "torch_eager" in times:
            res["torch_eager_step_s"] = times["torch_eager"]
            res["torch_compile_step_s"] = times["torch_compile"]
            res["train_step_vs_torch"] = times["torch_eager"]["median"] / vaekl_step["median"]
            res["train_step_vs_torch_compile"] = (times["torch_compile"]["median"]
                                                  / vaekl_step["median"])
    if "vmap8" in sections:
        # num_seeds=8 as training runs it (on CPU one seed after another) and vectorised.
        runs = {"one": vaekl_run, "eight": vaekl_epoch(steps, num_seeds=8)[0]}
        if jax.default_backend() == "cpu":
            runs["eight_vmapped"] = vaekl_epoch(steps, num_seeds=8, vmap_seeds=True)[0]
        t = {k: _stats(v, steps) for k, v in _timeit(runs, repeats).items()}
        res["vaekl_step_8_seeds_s"] = t["eight"]
        res["vaekl_step_1_seed_beside_8_s"] = t["one"]
        # Examples per second per seed x 8 against one seed's examples per second.
        res["vmap8_vs_1"] = 8 * t["one"]["median"] / t["eight"]["median"]
        if "eight_vmapped" in t:
            res["vaekl_step_8_seeds_vmapped_s"] = t["eight_vmapped"]
            res["vmap8_vectorised_vs_1"] = 8 * t["one"]["median"] / t["eight_vmapped"]["median"]
    if "iwae" in sections:
        images, samples = (20, 50) if quick else (FLAGS.iwae_images, 5000)
        res["iwae"] = _iwae_in_subprocess(images, samples, repeats)
        res["iwae5000_peak_rss_gb"] = res["iwae"]["peak_rss_gb"]
        res["iwae5000_vs_matmul"] = res["iwae"]["gflop_per_s"] / res["matmul_gflop_per_s"]
    if "burda" in sections:
        res["torch"] = torch.__version__
        res["burda"] = burda.measure(_timeit, _stats, 20 if quick else 200, repeats, True)
    if "elbo" in sections and FLAGS.data_dir and not quick:
        res.update(bench_time_to_elbo(FLAGS.data_dir, out))
    (out / "benchmark.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "benchmark.md").write_text(_markdown(res))
    print(_markdown(res))


def _markdown(res):
    keys = ("train_step_vs_torch", "train_step_vs_torch_compile", "train_step_vs_matmul",
            "iwae5000_peak_rss_gb", "iwae5000_vs_matmul", "vmap8_vs_1", "vmap8_vectorised_vs_1",
            "time_to_elbo_s", "elbo_after_10_epochs")
    lines = [f"# vaekl benchmark ({res['date']}, {res['machine']}, {res['cpu_count']} CPUs,"
             f" {res['device']})", "", "| key | value |", "|---|---|"]
    for k in keys:
        if k in res:
            v = res[k]
            lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if "import_s" in res:
        lines.append(f"| import_s (median) | {res['import_s']['median']:.3f} |")
    if "compile_s" in res:
        lines.append(f"| compile_s | {res['compile_s']:.3f} |")
    for k in ("vaekl_step_s", "matmul_chain_step_s", "torch_eager_step_s", "torch_compile_step_s",
              "vaekl_step_8_seeds_s", "vaekl_step_8_seeds_vmapped_s"):
        if k in res:
            cells = " / ".join(f"{1e3 * res[k][q]:.2f}" for q in ("min", "median", "max"))
            lines.append(f"| {k} min/median/max (ms) | {cells} |")
    return "\n".join(lines + (burda.markdown(res["burda"]) if "burda" in res else [])) + "\n"


if __name__ == "__main__":
    app.run(main)
