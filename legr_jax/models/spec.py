"""Channel spec of a prunable network, derived from one abstract trace.

A *group* is a set of mask sites (convs, zero-pad shortcuts) whose output
channels must be pruned together: outputs added into one residual stream, or
an expansion conv and the depthwise conv over it. Each group has one mask.
A *chain* (`NetSpec.chains`) links groups whose channels zero-pad shortcuts
copy one to one (a CIFAR ResNet's three residual streams); it says which
channels are one channel across the groups, the groups keep their own masks.

The spec is a frozen, hashable dataclass, so it can be a static argument of
``jax.jit`` and the cost model and ranking can loop over it at trace time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from legr_jax.models import blocks


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One conv. ``in_group`` is None when it reads the network input."""
  name: str
  in_group: str | None
  out_group: str
  in_channels: int
  out_channels: int
  kernel: tuple[int, int]
  strides: tuple[int, int]
  feature_group_count: int
  in_hw: tuple[int, int]
  out_hw: tuple[int, int]

  @property
  def depthwise(self) -> bool:
    return self.feature_group_count > 1


@dataclasses.dataclass(frozen=True)
class ShortcutSpec:
  """A parameter-free zero-padding shortcut from ``in_group`` to ``out_group``."""
  name: str
  in_group: str
  out_group: str
  in_channels: int
  out_channels: int
  index_map: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  name: str
  in_group: str | None
  in_features: int
  out_features: int


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """``members``: conv names whose outputs share the mask (trace order)."""
  name: str
  size: int
  members: tuple[str, ...]
  shortcuts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChainSpec:
  """Groups whose channels zero-pad shortcuts link one to one.

  ``positions[i][j]`` is the chain position of channel ``j`` of ``groups[i]``;
  channels at one position are one channel carried across the shortcuts (in a
  CIFAR ResNet with ``pad='append'``: channel ``j`` of every stage). Positions
  are ``0 .. size - 1``; the first group's channel ``j`` is at ``j``.
  """
  name: str
  size: int
  groups: tuple[str, ...]
  positions: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """Everything the cost model, ranking and surgery need about a network."""
  input_shape: tuple[int, int, int]
  convs: tuple[ConvSpec, ...]
  shortcuts: tuple[ShortcutSpec, ...]
  dense: DenseSpec
  groups: tuple[GroupSpec, ...]

  @property
  def group_names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.groups)

  @property
  def group_sizes(self) -> dict[str, int]:
    return {g.name: g.size for g in self.groups}

  @property
  def layer_names(self) -> tuple[str, ...]:
    """Prunable conv layers (those owning filters), in trace order."""
    return tuple(c.name for c in self.convs)

  def conv(self, name: str) -> ConvSpec:
    for c in self.convs:
      if c.name == name:
        return c
    raise KeyError(f"No conv named {name!r}; known: {self.layer_names}")

  def group(self, name: str) -> GroupSpec:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"No group named {name!r}; known: {self.group_names}")

  def chains(self) -> tuple[ChainSpec, ...]:
    """The groups linked by zero-pad shortcuts, in ``groups`` order.

    Every group is in exactly one chain (a group no shortcut links is a chain
    of one). Each group keeps its own mask; a chain only says which channels
    of different groups are the same channel, e.g. for scoring them together
    as the LeGR reference does (it sums the scores of the stem and every
    block's second conv of all three stages of a CIFAR ResNet at each
    position).

    Raises:
      ValueError: when the shortcuts do not link channels one to one (a
        channel copied twice, or two paths disagreeing).
    """
    return _chains(self)

  def full_masks(self, dtype=jnp.float32) -> dict[str, jnp.ndarray]:
    return {g.name: jnp.ones((g.size,), dtype) for g in self.groups}

  def site_masks(self, masks) -> dict:
    """Group masks -> per-site masks (the form the Flax modules consume)."""
    out = {c.name: masks[c.out_group] for c in self.convs}
    out.update({s.name: masks[s.out_group] for s in self.shortcuts})
    return out

  def check_masks(self, masks, *, allow_empty_groups: bool = False) -> None:
    """Raises ValueError on a wrong key set, shape or dtype; checks (when the
    masks are concrete) that no group is entirely masked."""
    if not isinstance(masks, dict):
      raise ValueError(f"masks must be a dict group name -> 1-D array, got "
                       f"{type(masks).__name__}. Start from spec.full_masks().")
    missing = set(self.group_names) - set(masks)
    extra = set(masks) - set(self.group_names)
    if missing or extra:
      raise ValueError(
          f"masks keys do not match the network's groups: missing "
          f"{sorted(missing)}, unknown {sorted(extra)}. Start from "
          "spec.full_masks().")
    for g in self.groups:
      m = masks[g.name]
      shape = getattr(m, "shape", None)
      if shape != (g.size,):
        raise ValueError(f"mask of group {g.name!r} has shape {shape}, "
                         f"expected ({g.size},).")
      dt = getattr(m, "dtype", None)
      if dt is None or not (jnp.issubdtype(dt, jnp.floating) or
                            jnp.issubdtype(dt, jnp.bool_)):
        raise ValueError(f"mask of group {g.name!r} has dtype {dt}; use a "
                         "float (0/1 or soft) or bool array.")
      if not allow_empty_groups:
        try:
          arr = np.asarray(m)
        except Exception:  # a tracer: cannot inspect values
          continue
        if not np.any(arr != 0):
          raise ValueError(
              f"every channel of group {g.name!r} (members {g.members}) is "
              "masked; keep at least one channel per group (e.g. "
              "masks_for_budget(..., safeguard=0.1)).")


@functools.lru_cache(maxsize=64)
def _chains(spec: NetSpec) -> tuple[ChainSpec, ...]:
  touching: dict[str, list[ShortcutSpec]] = {}
  for s in spec.shortcuts:
    if s.in_group is not None and s.in_group != s.out_group:
      touching.setdefault(s.in_group, []).append(s)
      touching.setdefault(s.out_group, []).append(s)
  sizes = spec.group_sizes
  rank = {name: i for i, name in enumerate(spec.group_names)}
  pos: dict[str, list[int]] = {}
  chains = []
  for g in spec.groups:
    if g.name in pos:
      continue
    pos[g.name], size, queue = list(range(g.size)), g.size, [g.name]
    linked = [g.name]
    while queue:
      h = queue.pop(0)
      for s in touching.get(h, ()):
        # (channel of the other group, chain position) for every copy
        if s.in_group == h:
          other = s.out_group
          pairs = [(j, pos[h][i]) for j, i in enumerate(s.index_map) if i >= 0]
        else:
          other = s.in_group
          pairs = [(i, pos[h][j]) for j, i in enumerate(s.index_map) if i >= 0]
        if (len({c for c, _ in pairs}) < len(pairs) or
            len({p for _, p in pairs}) < len(pairs)):
          raise ValueError(f"shortcut {s.name} copies a channel of "
                           f"{s.in_group!r} twice: no one-to-one chain")
        if other in pos:
          if any(pos[other][c] != p for c, p in pairs):
            raise ValueError(f"shortcut {s.name}: two paths give channels of "
                             f"{other!r} different chain positions")
          continue
        new = [-1] * sizes[other]
        for c, p in pairs:
          new[c] = p
        for c, p in enumerate(new):
          if p < 0:
            new[c], size = size, size + 1
        pos[other] = new
        linked.append(other)
        queue.append(other)
    linked.sort(key=rank.__getitem__)
    chains.append(ChainSpec(name=g.name, size=size, groups=tuple(linked),
                            positions=tuple(tuple(pos[n]) for n in linked)))
  return tuple(chains)


def spec_from_record(rec: blocks.Recorder,
                     input_shape: tuple[int, int, int]) -> NetSpec:
  """Turns a recorded trace into groups and per-conv wiring."""
  if len(rec.dense) != 1:
    raise ValueError(f"expected exactly one Classifier, found {len(rec.dense)}")
  root_members: dict[str, list[str]] = {}
  root_shortcuts: dict[str, list[str]] = {}
  sizes: dict[str, int] = {}
  input_root = rec.find(blocks.INPUT_NODE)
  for c in rec.convs:
    r = rec.find(c.out_node)
    root_members.setdefault(r, []).append(c.name)
    sizes.setdefault(r, c.out_channels)
    if sizes[r] != c.out_channels:
      raise ValueError(f"{c.name}: {c.out_channels} channels, but its group "
                       f"has {sizes[r]}")
  for s in rec.shortcuts:
    r = rec.find(s.out_node)
    if r not in root_members:
      raise ValueError(f"shortcut {s.name} is not added to any conv output")
    root_shortcuts.setdefault(r, []).append(s.name)
  if input_root in root_members:
    raise ValueError("a conv output is coupled to the network input")
  # Group name: its first member in trace order.
  group_of_root = {r: m[0] for r, m in root_members.items()}

  def group_of(node):
    r = rec.find(node)
    return None if r == input_root else group_of_root[r]

  convs = tuple(
      ConvSpec(name=c.name, in_group=group_of(c.in_node),
               out_group=group_of(c.out_node), in_channels=c.in_channels,
               out_channels=c.out_channels, kernel=c.kernel, strides=c.strides,
               feature_group_count=c.feature_group_count, in_hw=c.in_hw,
               out_hw=c.out_hw) for c in rec.convs)
  shortcuts = tuple(
      ShortcutSpec(name=s.name, in_group=group_of(s.in_node),
                   out_group=group_of(s.out_node), in_channels=s.in_channels,
                   out_channels=s.out_channels, index_map=s.index_map)
      for s in rec.shortcuts)
  d = rec.dense[0]
  dense = DenseSpec(d.name, group_of(d.in_node), d.in_features, d.out_features)
  groups = tuple(
      GroupSpec(name=group_of_root[r], size=sizes[r], members=tuple(m),
                shortcuts=tuple(root_shortcuts.get(r, ())))
      for r, m in root_members.items())
  return NetSpec(input_shape=tuple(input_shape), convs=convs,
                 shortcuts=shortcuts, dense=dense, groups=groups)
