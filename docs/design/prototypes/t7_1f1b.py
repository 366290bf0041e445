"""Miniature 2-rank 1F1B MPMD pipeline: each process runs only its own stage's programs.
args: pid port scheme   scheme = collective (tick-ordered ppermute plan) | keyed (transfer server uuids)"""
import sys, time, os
from common import *
from jax.experimental import transfer
from jax.sharding import SingleDeviceSharding
pid, port, scheme = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
S, M, STEPS = 2, 8, 3
B_, T_, D = 4, 64, 256
init(pid, S, port, heartbeat_timeout_seconds=10)
kv = jax._src.distributed.global_state.client
devs = [jax.local_devices(process_index=r)[0] for r in range(S)]
me = devs[pid]
ACT = jax.ShapeDtypeStruct((B_, T_, D), np.float32)

# ---------------------------------------------------------------- schedule + global plan
def one_f_one_b(S, M):
    orders = []
    for r in range(S):
        w = min(S - r - 1, M)
        ops = [("F", i) for i in range(w)]
        for i in range(M - w):
            ops += [("F", i + w), ("B", i)]
        ops += [("B", i) for i in range(M - w, M)]
        orders.append(ops)
    return orders

def tick_plan(S, M):
    """Unit-time simulation of 1F1B. Returns ops[r] = {tick: op} and xfers[tick] = list of
    (lo_rank, hi_rank, payload_lo_to_hi or None, payload_hi_to_lo or None) in one global order.
    Every process computes the same plan from (S, M)."""
    orders = one_f_one_b(S, M)
    done, ptr, t = {}, [0] * S, 0
    ops = [dict() for _ in range(S)]
    xfers = {}
    while any(ptr[r] < len(orders[r]) for r in range(S)):
        fired = []
        for r in range(S):
            if ptr[r] == len(orders[r]): continue
            k, i = orders[r][ptr[r]]
            dep = (r - 1, "F", i) if (k == "F" and r > 0) else (r + 1, "B", i) if (k == "B" and r < S - 1) else None
            if dep is None or done.get(dep, t) < t:
                fired.append((r, k, i))
        for r, k, i in fired:
            done[(r, k, i)] = t; ops[r][t] = (k, i); ptr[r] += 1
        for lo in range(S - 1):                       # transfers produced this tick, per adjacent pair
            up = next((("act", i) for r, k, i in fired if r == lo and k == "F"), None)
            down = next((("grad", i) for r, k, i in fired if r == lo + 1 and k == "B"), None)
            if up or down:
                xfers.setdefault(t, []).append((lo, lo + 1, up, down))
        t += 1
    return ops, xfers, t

# ---------------------------------------------------------------- the two stages
rng = np.random.default_rng(0)
W = [jax.device_put(rng.normal(size=(D, D)).astype(np.float32) / np.sqrt(D), devs[r]) if r == pid else None for r in range(S)]
W_np = [np.random.default_rng(0).normal(size=(D, D)).astype(np.float32) / np.sqrt(D) for _ in range(1)]
def data(step, i):
    g = np.random.default_rng(1000 * step + i)
    return g.normal(size=(B_, T_, D)).astype(np.float32), g.normal(size=(B_, T_, D)).astype(np.float32)

f0 = lambda w, x: jnp.tanh(x @ w)
f1 = lambda w, h, y: jnp.mean((h @ w - y) ** 2)
fwd0 = jax.jit(f0)
@jax.jit
def bwd0(w, x, g):                      # recompute forward, return dW0
    return jax.vjp(lambda w: f0(w, x), w)[1](g)[0]
@jax.jit
def fwdbwd1(w, h, y):                   # last stage: loss, dW1, dL/dh
    loss, (dw, dh) = jax.value_and_grad(f1, argnums=(0, 1))(w, h, y)
    return loss, dw, dh

# ---------------------------------------------------------------- transport
if scheme == "keyed":
    srv = transfer.start_transfer_server(me.client, "127.0.0.1:0", ["127.0.0.1:0"])
    kv.key_value_set(f"xfer/{pid}", srv.address())
    conns = {r: srv.connect(kv.blocking_key_value_get(f"xfer/{r}", 30_000)) for r in range(S) if abs(r - pid) == 1}
    spec = jax.ShapeDtypeStruct(ACT.shape, ACT.dtype, sharding=SingleDeviceSharding(me))
    def uuid(step, kind, i, src):
        return ((step * 2 + (kind == "grad")) * M + i) * S + src
    def send(step, kind, i, dst, x): srv.await_pull(uuid(step, kind, i, pid), [x])
    def recv(step, kind, i, src): return conns[src].pull(uuid(step, kind, i, src), [spec])[0]

def run_step(step):
    losses, dw = [], jnp.zeros((D, D), np.float32, device=me)
    inbox, keep = {}, {}
    if scheme == "collective":
        ops, xfers, T = PLAN
        for t in range(T):
            op = ops[pid].get(t)
            if op:
                k, i = op
                x, y = data(step, i)
                if pid == 0 and k == "F":
                    keep[("x", i)] = jax.device_put(x, me); inbox_out = fwd0(W[0], keep[("x", i)]); keep[("act", i)] = inbox_out
                elif pid == 0 and k == "B":
                    dw = dw + bwd0(W[0], keep.pop(("x", i)), inbox.pop(("grad", i)))
                elif pid == 1 and k == "F":
                    loss, dw1, dh = fwdbwd1(W[1], inbox.pop(("act", i)), jax.device_put(y, me))
                    keep[("dh", i)] = dh; losses.append(loss); dw = dw + dw1
                elif pid == 1 and k == "B":
                    keep[("grad", i)] = keep.pop(("dh", i))
            for lo, hi, up, down in xfers.get(t, []):   # every process walks the same global list
                if pid not in (lo, hi): continue
                a, b = devs[lo], devs[hi]
                if up and down:                          # both directions this tick: one exchange
                    mine = keep.pop(("act", up[1])) if pid == lo else keep.pop(("grad", down[1]))
                    got = exchange(mine, a, b)
                    inbox[down if pid == lo else up] = got
                elif up:
                    r = p2p(keep.pop(("act", up[1])) if pid == lo else None, ACT.shape, ACT.dtype, a, b)
                    if pid == hi: inbox[up] = r
                else:
                    r = p2p(keep.pop(("grad", down[1])) if pid == hi else None, ACT.shape, ACT.dtype, b, a)
                    if pid == lo: inbox[down] = r
    else:
        for k, i in one_f_one_b(S, M)[pid]:
            x, y = data(step, i)
            if pid == 0 and k == "F":
                keep[("x", i)] = jax.device_put(x, me)
                send(step, "act", i, 1, fwd0(W[0], keep[("x", i)]))        # non-blocking
            elif pid == 0 and k == "B":
                dw = dw + bwd0(W[0], keep.pop(("x", i)), recv(step, "grad", i, 1))
            elif pid == 1 and k == "F":
                loss, dw1, dh = fwdbwd1(W[1], recv(step, "act", i, 0), jax.device_put(y, me))
                keep[("dh", i)] = dh; losses.append(loss); dw = dw + dw1
            elif pid == 1 and k == "B":
                send(step, "grad", i, 0, keep.pop(("dh", i)))
    return dw, losses

PLAN = tick_plan(S, M)
if pid == 0:
    log("rank orders:", one_f_one_b(S, M))
    log("global transfer plan (tick: (lo, hi, lo->hi, hi->lo)):", PLAN[1])
for step in range(STEPS):
    t = time.perf_counter()
    dw, losses = run_step(step)
    dw.block_until_ready()
    dt = (time.perf_counter() - t) * 1e3
    # reference on this process (full model, numpy weights generated identically)
    Wr = np.random.default_rng(0).normal(size=(D, D)).astype(np.float32) / np.sqrt(D)
    def full(w0, w1, x, y): return f1(w1, f0(w0, x), y)
    ref = jnp.zeros((D, D))
    for i in range(M):
        x, y = data(step, i)
        g0, g1 = jax.grad(full, argnums=(0, 1))(Wr, Wr, x, y)
        ref = ref + (g0 if pid == 0 else g1)
    log(f"{scheme} step {step}: {dt:.1f} ms, max|dW{pid} - ref| = {float(jnp.max(jnp.abs(dw - ref))):.2e}",
        f"mean loss {float(jnp.mean(jnp.stack(losses))):.4f}" if losses else "")
kv.wait_at_barrier("end", 30_000)
os._exit(0)
