"""SGD with momentum and coupled weight decay as one pure function over
parameter pytrees, with every array updated in one C++ call on XLA:CPU.

Why: in a compiled training step the optax update of
`legr_jax.train.optim.make_optimizer` becomes a few small XLA fusions per
parameter array (hundreds for ResNet-56), each a kernel XLA:CPU generates
code for at every compile and a thunk it runs at every step. The tau_hat
search compiles one step per candidate (`legr_jax.search.fitness.sliced_sgd`),
so that code generation is paid per candidate. One FFI call
(`csrc/sgd_update.cc`, variadic, results aliased with the parameters and the
trace) replaces them (figures: benchmarks/RESULTS.md).

The maths is `optim.make_optimizer`'s (optax ``add_decayed_weights`` then
``sgd`` with momentum, no Nesterov) in the same order::

    u = g + weight_decay * p;  v = u + momentum * v;  p = p + (-lr) * v

with multiply-adds contracted to FMA as XLA:CPU contracts them, so the
kernel's results equal optax's bit for bit (tests/test_sgd_update.py).
Without the kernel (``cpu_kernel`` False, or None where the kernels are
unavailable, or a leaf not float32) it is `legr_jax.ops.sgd_momentum_update`,
the same formula in jax.numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from legr_jax import ops as ops_lib
from legr_jax.cpu import kernels

_TARGET = "legr_sgd_update"


def sgd_update(params, grads, trace, *, lr: float, momentum: float,
               weight_decay: float, cpu_kernel: bool | None = None):
  """One step: ``(params, trace) -> (new params, new trace)``.

  Args:
    params, grads, trace: pytrees of the same structure and leaves of the
      same shapes (``trace``: the momentum buffer, zeros at the start);
      the kernel takes float32 leaves only (else jax.numpy). Shapes that
      differ: ValueError.
    lr, momentum, weight_decay: Python floats (compile-time constants).
    cpu_kernel: use the C++ kernel (default: `kernels.available()`; True
      where they are unavailable: RuntimeError).
  Returns:
    ``(params, trace)`` with the structure of the inputs.
  """
  leaves, treedef = jax.tree.flatten(params)
  g_leaves = treedef.flatten_up_to(grads)
  v_leaves = treedef.flatten_up_to(trace)
  for p, g, v in zip(leaves, g_leaves, v_leaves):
    if not (p.shape == g.shape == v.shape):
      raise ValueError(f"sgd_update: shapes differ: param {p.shape}, grad "
                       f"{g.shape}, trace {v.shape}")
  if cpu_kernel is None:
    cpu_kernel = kernels.available()
  use_kernel = (cpu_kernel and leaves and
                all(x.dtype == jnp.float32
                    for x in leaves + g_leaves + v_leaves))
  if use_kernel:
    kernels.require("SGD update")
    n = len(leaves)
    out_types = [jax.ShapeDtypeStruct(p.shape, jnp.float32)
                 for p in leaves] * 2
    aliases = {i: i for i in range(n)}
    aliases.update({2 * n + i: n + i for i in range(n)})
    outs = jax.ffi.ffi_call(_TARGET, out_types,
                            input_output_aliases=aliases,
                            vmap_method="sequential")(
                                *leaves, *g_leaves, *v_leaves,
                                lr=np.float32(lr),
                                momentum=np.float32(momentum),
                                weight_decay=np.float32(weight_decay))
    new_p, new_v = outs[:n], outs[n:]
    return treedef.unflatten(new_p), treedef.unflatten(new_v)
  return ops_lib.sgd_momentum_update(params, grads, trace, lr=lr,
                                     momentum=momentum,
                                     weight_decay=weight_decay)


__all__ = ["sgd_update"]
