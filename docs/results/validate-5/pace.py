"""The machine's pace over a minute: a fixed loop (2,000 AES-GCM encryptions of 4 KiB, and a
small list each) timed every 50 ms, in microseconds an iteration. pace.txt is one run of it,
the README's *Where it stands*:

    python docs/results/validate-5/pace.py
"""

import os
import statistics
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

key, page, nonce = AESGCM(os.urandom(16)), os.urandom(4096), os.urandom(12)
took: list[float] = []
end = time.time() + 60
while time.time() < end:
    t = time.perf_counter()
    for _ in range(2000):
        key.encrypt(nonce, page, None)
        _ = list(range(20))
    took.append((time.perf_counter() - t) * 1e6 / 2000)
    time.sleep(0.05)
print(f"{len(took)} samples: min {min(took):.1f} median {statistics.median(took):.1f} "
      f"max {max(took):.1f} µs an iteration")
ranked = sorted(took)
print("10th, 25th, 50th, 75th, 90th percentiles:",
      [round(ranked[int(len(ranked) * q)], 1) for q in (0.1, 0.25, 0.5, 0.75, 0.9)])
