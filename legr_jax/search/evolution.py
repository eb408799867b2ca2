"""Regularized evolution over per-layer affine pairs, as pure state transitions.

LeGR (Chin et al. 2020) learns, for every prunable layer l, an affine pair
(alpha_l, kappa_l) that turns filter norms into globally comparable scores.
The search is regularized evolution (Real et al. 2019):

* Population P (64), tournament sample S (16, drawn with replacement), G
  evaluations in total (400), the initial population included.
* Initial members: member 0 is the identity (alpha = 1, kappa = 0); the others
  have alpha_l = exp(N(0, 1)) and kappa_l ~ N(0, std_l), std_l the standard
  deviation of layer l's filter norms.
* A child copies the lowest-loss member of the sample, then mutates
  ``max(1, int(mutate_fraction * L))`` layers chosen with replacement:
  alpha_l *= exp(N(0, step)), kappa_l += N(0, std_l), with
  ``step = 1 - e / (1.25 G)`` for the child's evaluation index e.
* The child replaces the oldest member.

Batched variant (K candidates per round). A round proposes K children at
once: K independent tournaments against the *current* population (none of the
round's children can be a parent in that round), evaluates them together,
then inserts them, child j replacing the j-th oldest member. With K = 1 this
is exactly the sequential algorithm above; with K > 1 parents are up to K - 1
evaluations staler, a different (slightly less greedy) variant. The initial
population is proposed in rounds of up to K too (no dependency there), and a
round never straddles the end of the initial population.

Randomness is a pure function of (seed, evaluation index): the candidate of
evaluation e uses ``fold_in(key, e)`` only. So the result does not depend on
how candidates are spread over devices, nor on restarts from a checkpoint; for
a given K it depends only on the seed.

All functions are pure over the `EvolutionState` pytree and jit-able (the
`EvolutionConfig` and round sizes are static).
"""

from __future__ import annotations

import dataclasses

import chex
import flax.struct
import jax
import jax.numpy as jnp

# Streams derived from one evaluation's key.
_TOURNAMENT, _LAYERS, _ALPHA, _KAPPA, _INIT_ALPHA, _INIT_KAPPA = range(6)


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
  """Static hyperparameters of the search (hashable: a jit static arg)."""
  population: int = 64
  sample: int = 16
  evaluations: int = 400
  mutate_fraction: float = 0.1

  def __post_init__(self):
    if self.population < 1 or self.sample < 1:
      raise ValueError("population and sample must be positive")
    if self.evaluations < self.population:
      raise ValueError(f"evaluations ({self.evaluations}) must cover the "
                       f"initial population ({self.population})")
    if not 0.0 <= self.mutate_fraction <= 1.0:
      raise ValueError("mutate_fraction must be in [0, 1]")

  def num_mutated(self, num_layers: int) -> int:
    return max(1, int(self.mutate_fraction * num_layers))

  def round_size(self, count: int, k: int) -> int:
    """Candidates in the round starting at evaluation ``count`` (<= k): a
    round never crosses the end of the initial population or of the search."""
    end = self.population if count < self.population else self.evaluations
    return max(0, min(k, end - count))


@flax.struct.dataclass
class EvolutionState:
  """The search state (everything a checkpoint needs).

  alpha, kappa: float32 [P, L] members' affine pairs (rows of empty slots are
    unused). loss: float32 [P], +inf for empty slots (and failed candidates).
  birth: int32 [P], evaluation index that created the member, -1 when empty.
  count: int32 scalar, evaluations inserted so far.
  key: uint32 [2] raw base key (constant). kappa_std: float32 [L], per-layer
  std of the filter norms (constant).
  best_alpha, best_kappa [L], best_loss, best_birth: the lowest-loss candidate
  evaluated so far (it may have aged out of the population); ties: earliest.
  """
  alpha: jax.Array
  kappa: jax.Array
  loss: jax.Array
  birth: jax.Array
  count: jax.Array
  key: jax.Array
  kappa_std: jax.Array
  best_alpha: jax.Array
  best_kappa: jax.Array
  best_loss: jax.Array
  best_birth: jax.Array


def init_state(seed: int, kappa_std, population: int) -> EvolutionState:
  """An empty population for layers with norm stds ``kappa_std`` [L]."""
  kappa_std = jnp.asarray(kappa_std, jnp.float32)
  chex.assert_rank(kappa_std, 1)
  n_layers = kappa_std.shape[0]
  return EvolutionState(
      alpha=jnp.ones((population, n_layers), jnp.float32),
      kappa=jnp.zeros((population, n_layers), jnp.float32),
      loss=jnp.full((population,), jnp.inf, jnp.float32),
      birth=jnp.full((population,), -1, jnp.int32),
      count=jnp.zeros((), jnp.int32),
      key=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
      kappa_std=kappa_std,
      best_alpha=jnp.ones((n_layers,), jnp.float32),
      best_kappa=jnp.zeros((n_layers,), jnp.float32),
      best_loss=jnp.full((), jnp.inf, jnp.float32),
      best_birth=jnp.full((), -1, jnp.int32))


def _eval_key(state: EvolutionState, index, stream: int):
  key = jax.random.wrap_key_data(state.key)
  return jax.random.fold_in(jax.random.fold_in(key, index), stream)


def _initial(state: EvolutionState, index):
  n_layers = state.kappa_std.shape[0]
  alpha = jnp.exp(jax.random.normal(_eval_key(state, index, _INIT_ALPHA),
                                    (n_layers,)))
  kappa = state.kappa_std * jax.random.normal(
      _eval_key(state, index, _INIT_KAPPA), (n_layers,))
  identity = index == 0
  return (jnp.where(identity, 1.0, alpha), jnp.where(identity, 0.0, kappa))


def _child(state: EvolutionState, config: EvolutionConfig, index):
  n_layers = state.kappa_std.shape[0]
  sample = jax.random.randint(_eval_key(state, index, _TOURNAMENT),
                              (config.sample,), 0, config.population)
  loss = jnp.where(jnp.isnan(state.loss), jnp.inf, state.loss)
  parent = sample[jnp.argmin(loss[sample])]   # ties: first in the sample
  n_mut = config.num_mutated(n_layers)
  layers = jax.random.randint(_eval_key(state, index, _LAYERS), (n_mut,), 0,
                              n_layers)
  step = 1.0 - index.astype(jnp.float32) / (1.25 * config.evaluations)
  d_log_alpha = step * jax.random.normal(_eval_key(state, index, _ALPHA),
                                         (n_mut,))
  d_kappa = state.kappa_std[layers] * jax.random.normal(
      _eval_key(state, index, _KAPPA), (n_mut,))
  # A layer drawn twice is mutated twice (the mutations compose additively).
  log_alpha = jnp.zeros((n_layers,)).at[layers].add(d_log_alpha)
  kappa = jnp.zeros((n_layers,)).at[layers].add(d_kappa)
  return (state.alpha[parent] * jnp.exp(log_alpha),
          state.kappa[parent] + kappa)


def propose(state: EvolutionState, config: EvolutionConfig, k: int):
  """The next round's ``k`` candidates (``k`` static, see `round_size`).

  Returns:
    ``(alpha [k, L], kappa [k, L], index [k])``: evaluations ``count ..
    count + k - 1``; initial members while ``count < P``, else children of
    K independent tournaments against the current population.
  """
  index = state.count + jnp.arange(k, dtype=jnp.int32)

  def one(i):
    init = _initial(state, i)
    child = _child(state, config, i)
    is_init = i < config.population
    return tuple(jnp.where(is_init, a, b) for a, b in zip(init, child))

  alpha, kappa = jax.vmap(one)(index)
  return alpha.astype(jnp.float32), kappa.astype(jnp.float32), index


def insert(state: EvolutionState, alpha, kappa, loss) -> EvolutionState:
  """Adds a round's evaluated candidates: child j takes the slot of the j-th
  oldest member (empty slots, birth -1, come first, in slot order)."""
  k = loss.shape[0]
  chex.assert_shape([alpha, kappa], (k, state.alpha.shape[1]))
  loss = jnp.asarray(loss, jnp.float32)
  loss = jnp.where(jnp.isnan(loss), jnp.inf, loss)
  slots = jnp.argsort(state.birth, stable=True)[:k]
  births = state.count + jnp.arange(k, dtype=jnp.int32)
  j = jnp.argmin(loss)                         # ties: first (earliest)
  better = loss[j] < state.best_loss
  state = state.replace(
      best_alpha=jnp.where(better, alpha[j], state.best_alpha),
      best_kappa=jnp.where(better, kappa[j], state.best_kappa),
      best_loss=jnp.where(better, loss[j], state.best_loss),
      best_birth=jnp.where(better, births[j], state.best_birth))
  return state.replace(
      alpha=state.alpha.at[slots].set(alpha),
      kappa=state.kappa.at[slots].set(kappa),
      loss=state.loss.at[slots].set(loss),
      birth=state.birth.at[slots].set(births),
      count=state.count + k)


def best(state: EvolutionState):
  """``(alpha [L], kappa [L], loss, evaluation index)`` of the lowest-loss
  candidate evaluated so far (ties: the earliest); this is the learned
  ranking. (The population's own best may be worse: members age out.)"""
  return (state.best_alpha, state.best_kappa, state.best_loss,
          state.best_birth)


def population_best(state: EvolutionState):
  """Like `best`, over the current population only."""
  key = jnp.where(state.birth < 0, jnp.inf, state.loss)
  i = jnp.lexsort((state.birth, key))[0]
  return state.alpha[i], state.kappa[i], state.loss[i], state.birth[i]


propose_jit = jax.jit(propose, static_argnums=(1, 2))
insert_jit = jax.jit(insert)
