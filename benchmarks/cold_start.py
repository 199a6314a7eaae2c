"""What a few milliseconds of other work cost the next small call on this machine.

The interleaved benchmarks time each provider once per round, after the others, as a training step
would run a penalty between a model's forward and backward. This probe times the same call right
after itself (back to back) and after a 5 ms pause of three kinds: a Python busy loop that touches
no memory, a sleep, and reading 64 MB. One thread, medians of 100.

    python benchmarks/cold_start.py
"""
from __future__ import annotations

import statistics
import time

import torch


def busy(seconds: float = 0.005) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    torch.set_num_threads(1)
    w, wt, out = torch.randn(64, 576), torch.randn(576, 32), torch.empty(64, 32)
    four_mb, big = torch.randn(1 << 20), torch.randn(16 << 20)
    calls = {
        "20 GEMMs 64×576 @ 576×32 (220 KB, fits L2)": lambda: [torch.mm(w, wt, out=out) for _ in range(20)],
        "sum of 4 MB": four_mb.sum,
    }
    pauses = {"back to back": lambda: None, "5 ms busy loop": busy, "5 ms sleep": lambda: time.sleep(0.005),
              "read 64 MB": big.sum}
    print(f"| call | {' | '.join(pauses)} |\n|---|{'---:|' * len(pauses)}")
    for name, call in calls.items():
        medians = []
        for pause in pauses.values():
            times = []
            for _ in range(100):
                pause()
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times) * 1e6)
        print(f"| {name} | {' | '.join(f'{m:.0f} µs' for m in medians)} |")


if __name__ == "__main__":
    main()
