"""Shared helpers for the cross-process prototypes (jax 0.10.2, CPU)."""
import os, sys, time
from functools import lru_cache
import numpy as np

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def init(pid, nproc, port, ndev=1, socket_port=None, **kw):
    jax.config.update("jax_num_cpu_devices", ndev)
    if socket_port is not None:
        jax.config.update("jax_cross_host_transfer_socket_address", f"127.0.0.1:{socket_port + pid}")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, **kw)
    return jax.local_devices()


def log(*a):
    print(f"[p{jax.process_index()} {time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---------------------------------------------------------------- ppermute p2p
@lru_cache(None)
def _pair_fn(devs, perm):
    """jit(shard_map(ppermute)) over a mesh of `devs` (one entry per participant)."""
    mesh = Mesh(np.array(devs), ("x",))
    sh = NamedSharding(mesh, P("x"))
    f = jax.jit(jax.shard_map(lambda v: jax.lax.ppermute(v, "x", perm),
                              mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    return f, sh


@lru_cache(None)
def _zeros(shape, dtype, dev):
    return jax.device_put(np.zeros(shape, dtype), dev)


def p2p(x, shape, dtype, src, dst):
    """Point-to-point src->dst. BOTH processes call it. Sender passes x (on device src),
    receiver passes None. Returns the array on dst for the receiver, None for the sender."""
    me = jax.process_index()
    f, sh = _pair_fn((src, dst), ((0, 1),))
    if src.process_index == me:
        local, mine = x, src
    else:
        local, mine = _zeros(shape, np.dtype(dtype), dst), dst
    g = jax.make_array_from_single_device_arrays((2 * shape[0],) + tuple(shape[1:]), sh, [local])
    out = f(g)
    if dst.process_index == me:
        return out.addressable_data(0)
    return None


def exchange(x, a, b):
    """Bidirectional swap: process owning a sends x to b, process owning b sends its x to a.
    Both call with their own payload (same shape/dtype); each gets the other's payload."""
    f, sh = _pair_fn((a, b), ((0, 1), (1, 0)))
    g = jax.make_array_from_single_device_arrays((2 * x.shape[0],) + x.shape[1:], sh, [x])
    return f(g).addressable_data(0)


# ---------------------------------------------------------------- hang watchdog
import threading, faulthandler


class Watchdog:
    """Kills this process if the main loop makes no progress for `timeout_s` seconds.
    Call .beat() after every step/transfer that completed; .stop() at the end.
    gloo waits up to 30 min on a mismatched collective and the transfer-server pull ignores
    its timeout, so an application-level deadline is the only bounded exit."""

    def __init__(self, timeout_s, poll_s=0.5):
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.last = time.monotonic(); self.label = "start"; self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def beat(self, label=""):
        self.last = time.monotonic(); self.label = label

    def stop(self):
        self._stop = True

    def _run(self):
        while not self._stop:
            time.sleep(self.poll_s)
            if time.monotonic() - self.last > self.timeout_s:
                print(f"[watchdog p{jax.process_index()}] no progress for {self.timeout_s}s after "
                      f"'{self.label}'; exiting", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=False)
                os._exit(70)


# ---------------------------------------------------------------- canonical per-pair channel
def pair_transfer(x, shape, dtype, src, dst, payload_back=None):
    """One gloo context per process pair: the mesh is always (lower-process device, higher-process
    device); the permutation encodes the direction. Both processes call it.
      one-way: sender passes x, receiver passes None       -> receiver gets the array, sender None
      exchange: pass payload_back=True and your own x       -> each gets the other's array"""
    lo, hi = sorted((src, dst), key=lambda d: (d.process_index, d.id))
    if payload_back:
        perm = ((0, 1), (1, 0))
    else:
        perm = ((0, 1),) if src == lo else ((1, 0),)
    f, sh = _pair_fn((lo, hi), perm)
    me = jax.process_index()
    local = x if x is not None else _zeros(tuple(shape), np.dtype(dtype), dst)
    g = jax.make_array_from_single_device_arrays((2 * shape[0],) + tuple(shape[1:]), sh, [local])
    out = f(g)
    if payload_back or dst.process_index == me:
        return out.addressable_data(0)
    return None
