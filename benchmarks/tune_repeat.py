"""Four --tune runs in a row per map shape (issue 24): one map, then tune(), four times.

Run: python benchmarks/tune_repeat.py (a quiet host; prints the size each tune chose)."""
import time
import numpy as np
import poolmagic
from poolmagic.tune import tune

def cpu(x):
    s = 0
    for i in range(200_000):
        s += i * x % 7
    return s

def matmul(x):
    a = np.random.default_rng(x).random((300, 300))
    for _ in range(20):
        a = a @ a / 300
    return float(a.sum())

def nap(x):
    time.sleep(0.05)
    return x

pool = poolmagic.Pool(2)
for name, f, items in (("cpu", cpu, range(32)), ("numpy", matmul, range(24)), ("sleep", nap, range(64))):
    chosen = []
    for k in range(4):
        pool.resize(2)
        pool.map(f, items)
        r = tune(pool)
        chosen.append(pool.size)
        if k == 0:
            print(r.text().splitlines()[0] if hasattr(r, "text") else r, flush=True)
    print(name, "chosen", chosen, flush=True)
pool.close()
