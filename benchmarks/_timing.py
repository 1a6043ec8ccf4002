"""Best-of-n wall-clock timing shared by the benchmark scripts."""

import time


def best_of(fn, repeats: int = 3) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs, in seconds (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name: str, candidate: float, baseline: float, baseline_name: str) -> None:
    print(f"{name}: {candidate:.3f} s; {baseline_name}: {baseline:.3f} s; "
          f"speed-up {baseline / candidate:.2f}x")
