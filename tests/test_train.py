"""Tests of legr_jax.train: optimizer semantics, masked steps, evaluation,
data parallelism, checkpoint/resume, NaN stop, workdir safety and the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from legr_jax import data, models, surgery, train
from legr_jax.data.local import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  """200 real digits (8x8x1) in an npz: 160 train / 40 val with val_size=40."""
  x, y = load_digits()
  path = tmp_path_factory.mktemp("data") / "digits200.npz"
  np.savez(path, x=x[:200], y=y[:200], x_test=x[200:300], y_test=y[200:300])
  return str(path)


def _tiny_config(npz, **kw):
  base = dict(model="cnn_small", dataset=f"npz:{npz}", val_size=40,
              augment="cifar", epochs=2, batch_size=32, lr=0.05,
              ckpt_every_steps=3, log_every_steps=2, eval_batch_size=64,
              keep_checkpoints=2)
  base.update(kw)
  return train.TrainConfig(**base)


def _batch(n=32, seed=0):
  x, y = load_digits()
  idx = np.random.default_rng(seed).choice(len(x), n, replace=False)
  return {"image": jnp.asarray((x[idx].astype(np.float32) - 77.5) / 95.7),
          "label": jnp.asarray(y[idx])}


# --- optimizer and schedules ------------------------------------------------------


def test_multistep_schedule_steps_at_30_60_80_percent():
  sched = train.make_schedule(0.1, epochs=10, steps_per_epoch=5)
  lrs = np.array([float(sched(s)) for s in range(50)])
  np.testing.assert_allclose(lrs[:15], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[15:30], 0.02, rtol=1e-6)
  np.testing.assert_allclose(lrs[30:40], 0.004, rtol=1e-6)
  np.testing.assert_allclose(lrs[40:], 0.0008, rtol=1e-5)


def test_cosine_and_warmup_schedules():
  cos = train.make_schedule(1.0, epochs=4, steps_per_epoch=25,
                            schedule="cosine")
  assert float(cos(0)) == pytest.approx(1.0)
  assert float(cos(50)) == pytest.approx(0.5, abs=1e-6)
  assert float(cos(100)) == pytest.approx(0.0, abs=1e-6)
  warm = train.make_schedule(1.0, epochs=10, steps_per_epoch=10,
                             warmup_epochs=1)
  assert float(warm(5)) == pytest.approx(0.5)
  assert float(warm(20)) == pytest.approx(1.0)
  assert float(warm(35)) == pytest.approx(0.2)  # same boundaries as no warmup
  with pytest.raises(ValueError):
    train.make_schedule(1.0, epochs=1, steps_per_epoch=1, schedule="step")


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_pytorch_sgd_with_coupled_weight_decay(nesterov):
  """p, v follow torch.optim.SGD(lr, momentum, weight_decay, nesterov)."""
  lr, mu, wd = 0.1, 0.9, 0.05
  opt = train.make_optimizer(lr, momentum=mu, nesterov=nesterov,
                             weight_decay=wd)
  p = jnp.array([1.0, -2.0, 3.0])
  state = opt.init(p)
  p_ref, v = np.array(p), np.zeros(3)
  rng = np.random.default_rng(0)
  for _ in range(4):
    g = rng.normal(size=3)
    updates, state = opt.update(jnp.asarray(g, jnp.float32), state, p)
    p = optax.apply_updates(p, updates)
    d = g + wd * p_ref          # weight decay enters the gradient
    v = mu * v + d              # then the momentum buffer
    p_ref = p_ref - lr * (d + mu * v if nesterov else v)
  np.testing.assert_allclose(np.asarray(p), p_ref, rtol=1e-5)


def test_cross_entropy_with_label_smoothing():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 2])
  logp = np.asarray(jax.nn.log_softmax(logits))
  plain = -logp[[0, 1], [0, 2]]
  np.testing.assert_allclose(train.cross_entropy(logits, labels), plain,
                             rtol=1e-6)
  eps = 0.3
  target = np.full((2, 3), eps / 3)
  target[[0, 1], [0, 2]] += 1 - eps
  np.testing.assert_allclose(train.cross_entropy(logits, labels, eps),
                             -(target * logp).sum(-1), rtol=1e-6)


# --- steps ---------------------------------------------------------------------


def test_train_step_learns_and_updates_batch_stats():
  net = models.get("cnn_small", input_shape=(8, 8, 1))
  opt = train.make_optimizer(0.05)
  state = train.init_train_state(net, 0, opt)
  stats0 = state.batch_stats
  step = jax.jit(lambda s, b: train.train_step(net, opt, s, b, None))
  batch = _batch()
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert int(state.step) == 15
  assert losses[-1] < 0.5 * losses[0]
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), stats0,
                         state.batch_stats)
  assert all(jax.tree.leaves(changed))
  # Inference uses the running statistics: the eval-mode output differs from
  # the train-mode one and does not depend on the rest of the batch.
  one = net.apply(state.variables, batch["image"][:1], None, train=False)
  many = net.apply(state.variables, batch["image"], None, train=False)
  np.testing.assert_allclose(one, many[:1], rtol=1e-4, atol=1e-5)


def test_masked_training_equals_the_sliced_network():
  net = models.get("cnn_small", input_shape=(8, 8, 1))
  masks = net.spec.full_masks()
  masks["conv0"] = masks["conv0"].at[::2].set(0.0)
  masks["conv2"] = masks["conv2"].at[:40].set(0.0)
  opt = train.make_optimizer(0.05)
  state = train.init_train_state(net, 1, opt)
  step = jax.jit(lambda s, b, m: train.train_step(net, opt, s, b, m))
  for i in range(5):
    state, _ = step(state, _batch(seed=i), masks)
  small, small_vars = surgery.slice_network(net, state.variables, masks)
  x = _batch(seed=9)["image"]
  np.testing.assert_allclose(net.apply(state.variables, x, masks),
                             small.apply(small_vars, x, None),
                             rtol=1e-4, atol=1e-5)
  # Also in training mode (batch statistics), i.e. in every forward pass.
  full_train, _ = net.apply(state.variables, x, masks, train=True)
  small_train, _ = small.apply(small_vars, x, None, train=True)
  np.testing.assert_allclose(full_train, small_train, rtol=1e-4, atol=1e-4)
  # And the masks matter: without them the output is different.
  assert not np.allclose(net.apply(state.variables, x, None),
                         small.apply(small_vars, x, None), atol=1e-3)


def test_bfloat16_compute_step_is_close_to_float32():
  net = models.get("cnn_small", input_shape=(8, 8, 1))
  opt = train.make_optimizer(0.05)
  state = train.init_train_state(net, 0, opt)
  batch = _batch()
  step = jax.jit(lambda s, b, dtype: train.train_step(
      net, opt, s, b, None, compute_dtype=dtype), static_argnums=2)
  _, m32 = step(state, batch, "float32")
  s16, m16 = step(state, batch, "bfloat16")
  assert s16.params["conv0"]["conv"]["kernel"].dtype == jnp.float32
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=0.05)


def _conv_dtypes(jaxpr, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out.append(str(eqn.invars[0].aval.dtype))
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        _conv_dtypes(inner, out)
  return out


def test_bfloat16_compute_runs_the_convs_in_bfloat16():
  net = models.get("cnn_small", input_shape=(8, 8, 1))
  opt = train.make_optimizer(0.05)
  state = train.init_train_state(net, 0, opt)
  jaxpr = jax.make_jaxpr(lambda s, b: train.train_step(
      net, opt, s, b, None, compute_dtype="bfloat16"))(state, _batch(4))
  dtypes = _conv_dtypes(jaxpr.jaxpr, [])
  assert dtypes and set(dtypes) == {"bfloat16"}, dtypes


def test_evaluate_is_exact_for_any_batch_size():
  net = models.get("cnn_small", input_shape=(8, 8, 1))
  variables = net.init(jax.random.PRNGKey(3))
  ds = data.get_dataset("digits")
  x, y = ds.val.take(np.arange(len(ds.val)))
  logits = net.apply(variables, jnp.asarray(data.normalize(x, ds.mean,
                                                           ds.std)), None)
  want_acc = float(np.mean(np.argmax(logits, -1) == y))
  want_loss = float(np.mean(train.cross_entropy(logits, jnp.asarray(y))))
  for bs in (144, 50, 7):
    loss, acc = train.evaluate(net, variables, ds.val, None, bs,
                               mean=ds.mean, std=ds.std)
    assert acc == pytest.approx(want_acc, abs=1e-9)
    assert loss == pytest.approx(want_loss, rel=1e-5)


# --- data parallel -------------------------------------------------------------

_TWO_DEVICES = textwrap.dedent("""
    import json, jax, numpy as np
    from legr_jax import models, train
    from legr_jax.data.local import load_digits
    assert jax.device_count() == 2, jax.devices()
    x, y = load_digits()
    # Digits take few distinct values: exact ties in max pooling would send
    # a gradient to either element on float noise; jitter breaks them.
    x = x + np.random.default_rng(0).normal(0.0, 0.5, x.shape)
    net = models.get("cnn_small", input_shape=(8, 8, 1))
    opt = train.make_optimizer(train.make_schedule(
        0.05, epochs=1, steps_per_epoch=4))
    out = {}
    for n in (1, 2):
      mesh = train.make_mesh(jax.devices()[:n])
      step = train.make_train_step(net, opt, mesh, label_smoothing=0.1)
      state = train.replicate(train.init_train_state(net, 0, opt), mesh)
      for i in range(4):
        sl = slice(32 * i, 32 * (i + 1))
        batch = jax.device_put(
            {"image": ((x[sl] - 77.5) / 95.7).astype(np.float32),
             "label": y[sl]}, train.batch_sharding(mesh))
        state, m = step(state, batch, None)
      assert len(batch["image"].sharding.device_set) == n
      assert len(state.params["conv0"]["conv"]["kernel"].sharding.device_set) == n
      out[n] = {"loss": float(m["loss"]),
                "leaves": [np.asarray(a).ravel().tolist()
                           for a in jax.tree.leaves(state.variables)]}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_two_devices_give_the_same_result_as_one():
  proc = subprocess.run(
      [sys.executable, "-c", _TWO_DEVICES], capture_output=True, text=True,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu"), timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  out = json.loads(line[len("RESULT"):])
  one, two = out["1"], out["2"]
  assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
  for a, b in zip(one["leaves"], two["leaves"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- fit: resume, NaN, workdir safety -----------------------------------------------


def _leaves(variables):
  return [np.asarray(a) for a in jax.tree.leaves(variables)]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_params(tiny_npz, tmp_path):
  cfg = _tiny_config(tiny_npz)
  ref = train.fit(cfg, str(tmp_path / "ref"), progress=False)
  assert ref.result["steps"] == 10  # 160 train / 32 = 5 steps x 2 epochs

  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
         "--model=cnn_small", f"--dataset=npz:{tiny_npz}", "--val_size=40",
         "--augment=cifar", "--epochs=2", "--batch_size=32", "--lr=0.05",
         "--ckpt_every_steps=3", "--log_every_steps=2",
         "--eval_batch_size=64", "--keep_checkpoints=2", "--noprogress",
         "--debug_crash_at_step=8"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL mid-epoch 2
  assert not os.path.exists(os.path.join(workdir, "result.json"))
  manager = train.make_manager(os.path.join(workdir, "checkpoints"),
                               read_only=True)
  assert manager.latest_step() == 6
  manager.close()

  resumed = train.fit(cfg, workdir, progress=False)
  for a, b in zip(_leaves(ref.variables), _leaves(resumed.variables)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert resumed.result["test_accuracy"] == pytest.approx(
      ref.result["test_accuracy"])
  events = [r for r in train.read_metrics(workdir) if "event" in r]
  assert [e["event"] for e in events] == ["start", "resume", "done"]
  assert events[1]["step"] == 6
  steps = [r["step"] for r in train.read_metrics(workdir)
           if r.get("split") == "train"]
  assert steps == sorted(steps) and steps[-1] == 10


def test_finished_run_outputs_and_load_trained(tiny_npz, tmp_path):
  cfg = _tiny_config(tiny_npz, epochs=3, ckpt_every_steps=0)
  workdir = str(tmp_path / "run")
  out = train.fit(cfg, workdir, progress=False)
  for f in ("config.json", "net.json", "metrics.jsonl", "result.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  result = json.load(open(os.path.join(workdir, "result.json")))
  assert result["test_split"] == "test" and 0 <= result["test_accuracy"] <= 1
  splits = [r.get("split") for r in train.read_metrics(workdir)]
  assert splits.count("val") == 3 and splits.count("test") == 1
  assert train.TrainConfig.from_dict(
      json.load(open(os.path.join(workdir, "config.json")))) == cfg

  net, variables, config = train.load_trained(workdir, which="latest")
  assert config == cfg and net.config == out.net.config
  ds = train.load_dataset(cfg)
  _, acc = train.evaluate(net, variables, ds.test, None, 64, mean=ds.mean,
                          std=ds.std)
  assert acc == pytest.approx(result["test_accuracy"])
  best_step = result["best_step"]
  _, best_vars, _ = train.load_trained(workdir, which="best")
  _, best_val = train.evaluate(net, best_vars, ds.val, None, 64, mean=ds.mean,
                               std=ds.std)
  assert best_val == pytest.approx(result["best_val_accuracy"])
  assert best_step in (5, 10, 15)

  # Same config again: nothing is retrained or overwritten.
  mtime = os.path.getmtime(os.path.join(workdir, "result.json"))
  again = train.fit(cfg, workdir, progress=False)
  assert again.result == result
  assert os.path.getmtime(os.path.join(workdir, "result.json")) == mtime


def test_different_run_is_refused_unless_overwrite(tiny_npz, tmp_path):
  cfg = _tiny_config(tiny_npz, epochs=1, ckpt_every_steps=0)
  workdir = str(tmp_path / "run")
  train.fit(cfg, workdir, progress=False)
  with pytest.raises(train.WorkdirConflictError, match="lr"):
    train.fit(cfg.replace(lr=0.01), workdir, progress=False)
  net = models.get("cnn_small", input_shape=(8, 8, 1))
  masks = net.spec.full_masks()
  masks["conv1"] = masks["conv1"].at[:4].set(0.0)
  with pytest.raises(train.WorkdirConflictError, match="masks"):
    train.fit(cfg, workdir, net=net, masks=masks, progress=False)
  # Operational fields may change.
  train.fit(cfg.replace(log_every_steps=1), workdir, progress=False)
  out = train.fit(cfg.replace(lr=0.01), workdir, overwrite=True,
                  progress=False)
  assert json.load(open(os.path.join(workdir, "config.json")))["lr"] == 0.01
  assert out.result["steps"] == 5
  # A folder with run files but no config.json is not silently reused.
  odd = tmp_path / "odd"
  odd.mkdir()
  (odd / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(train.WorkdirConflictError):
    train.fit(cfg, str(odd), progress=False)


def test_masked_fit_saves_and_reloads_masks(tiny_npz, tmp_path):
  cfg = _tiny_config(tiny_npz, epochs=1, ckpt_every_steps=0)
  net = models.get("cnn_small", input_shape=(8, 8, 1))
  masks = net.spec.full_masks()
  masks["conv3"] = masks["conv3"].at[10:].set(0.0)
  out = train.fit(cfg, str(tmp_path), net=net, masks=masks, progress=False)
  saved = train.load_masks(str(tmp_path))
  np.testing.assert_array_equal(saved["conv3"], np.asarray(masks["conv3"]))
  net2, variables, _ = train.load_trained(str(tmp_path))
  small, small_vars = surgery.slice_network(net2, variables, saved)
  x = _batch()["image"]
  np.testing.assert_allclose(net2.apply(variables, x, saved),
                             small.apply(small_vars, x, None), rtol=1e-4,
                             atol=1e-5)
  assert out.result["steps"] == 5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_npz, tmp_path):
  cfg = _tiny_config(tiny_npz, lr=1e8, epochs=4, ckpt_every_steps=1,
                     log_every_steps=1)
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.TrainingDivergedError, match="diverged"):
    train.fit(cfg, workdir, progress=False)
  assert not os.path.exists(os.path.join(workdir, "result.json"))
  events = [r for r in train.read_metrics(workdir)
            if r.get("event") == "diverged"]
  assert len(events) == 1
  last = events[0]["last_checkpoint"]
  net, variables, _ = train.load_trained(workdir, which="latest")
  assert all(np.isfinite(a).all() for a in _leaves(variables))
  if last is not None:
    assert train.make_manager(os.path.join(workdir, "checkpoints"),
                              read_only=True).latest_step() == last


# --- CLI -------------------------------------------------------------------------


def test_cli_helpfull_documents_the_flags():
  proc = subprocess.run([sys.executable, "-m", "experiments.train",
                         "--helpfull"], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=120,
                        check=False)
  text = proc.stdout + proc.stderr
  for flag in ("--model", "--dataset", "--epochs", "--workdir",
               "overwrite", "--lr", "--schedule", "nesterov",
               "--label_smoothing", "--compute_dtype", "--data_dir"):
    assert flag in text, flag


def test_progress_printer_shows_metrics_and_eta():
  import io
  buf = io.StringIO()
  bar = train.Progress(10, desc="train", stream=buf, min_interval=0.0)
  for i in range(1, 11):
    bar.update(i, loss=1.0 / i)
  bar.close()
  lines = buf.getvalue().splitlines()
  assert lines[-1].startswith("train 10/10") and "loss=0.1" in lines[-1]
  assert "ETA 00:00" in lines[-1] and "it/s" in lines[-1]
