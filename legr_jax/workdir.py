"""One job per workdir: a lock file held while a job writes its workdir.

  with WorkdirLock(path, "train"):      # or lock = ....acquire(); release()
    ...                                 # write under path

`WorkdirLock.acquire` creates ``path`` if needed and, atomically,
``path/.legr_lock``: JSON with the host name, process id (and its start
time, so a reused pid is not mistaken for the holder), the job and a random
token. A second job on the same workdir, or on a workdir inside one another
job holds, gets `WorkdirLockedError` naming the holder and what to do. A
lock left on this host by a process that no longer runs (a killed job) is
stale: it is replaced, with a warning. A lock taken on another host cannot be
checked from here and is refused; its message says how to remove it.

Multi-host jobs whose hosts share the workdir lock it once: only process 0
(``primary=True``; the others pass False and hold nothing). Child processes
of a job inherit its token through the environment (``LEGR_WORKDIR_LOCKS``):
experiments.legr_pipeline's stages may lock the stage workdirs inside its
own.

Standard library only (importing the package `legr_jax` imports JAX,
though).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time

LOCK_FILE = ".legr_lock"
ENV = "LEGR_WORKDIR_LOCKS"


class WorkdirLockedError(RuntimeError):
  """Another job holds the workdir (or a workdir around it)."""
  exit_code = 2


def _start_ticks(pid: int) -> int | None:
  """Start time of process ``pid`` (clock ticks after boot; Linux), or
  None when unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[19])
  except (OSError, IndexError, ValueError):
    return None


def holder_alive(info: dict) -> bool | None:
  """Whether the lock's process still runs: True / False on this host, None
  when it cannot be told (another host, or an unreadable lock)."""
  if not isinstance(info, dict) or info.get("host") != socket.gethostname():
    return None
  try:
    pid = int(info["pid"])
  except (KeyError, TypeError, ValueError):
    return None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, another user's
  ticks = _start_ticks(pid)
  if info.get("start") is not None and ticks is not None and (
      ticks != info["start"]):
    return False  # the pid was reused by another process
  return True


def read_lock(workdir: str) -> dict | None:
  """The lock of ``workdir`` as a dict, ``{}`` when unreadable, None when
  there is none."""
  try:
    with open(os.path.join(workdir, LOCK_FILE)) as f:
      info = json.load(f)
    return info if isinstance(info, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def _inherited() -> set[str]:
  return {t for t in os.environ.get(ENV, "").split(os.pathsep) if t}


def _describe(info: dict) -> str:
  if not info:
    return "an unknown job (the lock file is unreadable)"
  since = info.get("time")
  when = (time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(since))
          if isinstance(since, (int, float)) else "")
  return (f"{info.get('job', 'a job')} (pid {info.get('pid')} on host "
          f"{info.get('host')}{when})")


def _refusal(workdir: str, holder_dir: str, info: dict) -> str:
  lock = os.path.join(holder_dir, LOCK_FILE)
  where = (f"{workdir} is in use by" if holder_dir == workdir else
           f"{workdir} lies inside {holder_dir}, which is in use by")
  remote = (" (it ran on another host, which cannot be checked from here)"
            if info and holder_alive(info) is None else "")
  return (f"{where} {_describe(info)}: wait for that job to finish or choose "
          f"another --workdir. If no such job runs any more{remote}, delete "
          f"{lock}.")


class WorkdirLock:
  """The lock of one workdir for one job (see the module doc)."""

  def __init__(self, workdir: str, job: str, *, primary: bool = True,
               log=None):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.job = job
    self.primary = primary
    self.token = secrets.token_hex(8)
    self.held = False
    self._created = False
    self._env_before = None
    self._log = log or (lambda s: print(s, file=sys.stderr, flush=True))

  def _check_ancestors(self) -> None:
    inherited = _inherited()
    d = os.path.realpath(self.workdir)
    while True:
      parent = os.path.dirname(d)
      if parent == d:
        return
      d = parent
      info = read_lock(d)
      if info is None or info.get("token") in inherited:
        continue
      if holder_alive(info) is False:
        continue  # stale; its own workdir's next job removes it
      raise WorkdirLockedError(_refusal(self.workdir, d, info))

  def _create(self) -> bool:
    """Creates the lock file atomically; False when one exists."""
    doc = {"host": socket.gethostname(), "pid": os.getpid(),
           "start": _start_ticks(os.getpid()), "job": self.job,
           "token": self.token, "time": time.time()}
    tmp = f"{self.path}.{self.token}.tmp"
    with open(tmp, "w") as f:
      json.dump(doc, f)
      f.write("\n")
    try:
      os.link(tmp, self.path)   # atomic, fails if the lock exists
      return True
    except FileExistsError:
      return False
    except OSError:             # no hard links here: exclusive create
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.write("\n")
      return True
    finally:
      os.remove(tmp)

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (creating the workdir); raises `WorkdirLockedError`
    when another live job holds it or a workdir around it."""
    if not self.primary or self.held:
      return self
    self._check_ancestors()
    self._created = not os.path.exists(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(5):
      info = read_lock(self.workdir)   # read first: a refusal writes nothing
      if info is None:
        if self._create():
          self.held = True
          self._env_before = os.environ.get(ENV)
          os.environ[ENV] = os.pathsep.join(
              [t for t in [self._env_before, self.token] if t])
          return self
        continue  # taken meanwhile: look again
      if (info.get("token") in _inherited()
          and info.get("pid") != os.getpid()):
        return self  # our parent job holds it: we are part of that job
      if holder_alive(info) is False:
        if read_lock(self.workdir) == info:  # not replaced meanwhile
          self._log(f"warning: removing the stale lock {self.path} of "
                    f"{_describe(info)}, which no longer runs")
          try:
            os.remove(self.path)
          except FileNotFoundError:
            pass
        continue
      self._remove_if_created()
      raise WorkdirLockedError(_refusal(self.workdir, self.workdir, info))
    raise WorkdirLockedError(f"could not lock {self.workdir}: its lock "
                             f"{self.path} keeps changing; is another job "
                             "starting there?")

  def _remove_if_created(self) -> None:
    if self._created:
      try:
        os.rmdir(self.workdir)   # only if still empty
      except OSError:
        pass

  def release(self) -> None:
    """Removes the lock if this object holds it (and the workdir, if the
    lock created it and the job wrote nothing)."""
    if not self.held:
      return
    self.held = False
    if self._env_before is None:
      os.environ.pop(ENV, None)
    else:
      os.environ[ENV] = self._env_before
    info = read_lock(self.workdir)
    if info and info.get("token") == self.token:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self._remove_if_created()

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
