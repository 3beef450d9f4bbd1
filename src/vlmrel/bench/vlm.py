"""Benchmark: VLM annotation throughput against the simulator, seed loop vs vlmrel's client vs cache.

    python -m vlmrel.bench vlm --json [--requests 400] [--latency 0.2] [--slots 8] [--sequential-n 50]

The simulator (a simulator, not a model) answers each request after ``--latency`` seconds and
handles at most ``--slots`` requests at once (the rest queue, like vLLM or Ollama), so the
server's capacity is ``slots / latency`` requests per second. Every request is an annotation
(seed 004's prompt and schema) of its own small seeded image.

- **seed loop**: seed 004's approach, one request at a time through the official ``openai``
  client with the full PNG as a data URL, answers parsed with ``json.loads``. It runs
  ``--sequential-n`` requests (all 400 take ``400 x latency``) and its time for all is
  extrapolated from its measured throughput.
- **vlmrel**: :func:`vlmrel.vlm.run_requests` with ``slots`` concurrent requests, schema
  validation and the persistent cache, from an empty cache. Its wall time is the whole call
  (setup, first connections, the last answers), so 400 requests at 40 req/s take at least
  10 s and 0.95 of capacity leaves 0.53 s for everything the client adds. The simulator's
  slot counters say where it went: ``server_slot_utilization`` is slot-seconds used /
  (wall x slots), ``server_slot_s_per_request`` the mean time a request held its slot (the
  latency, if the simulator adds nothing); the rest of the wall time is the client's setup
  and the gaps between an answer leaving a slot and the next request taking it.
- **cached**: the same 400 requests again, every answer from the cache.

Targets: ``fraction_of_capacity`` (vlmrel throughput / capacity) >= 0.95; cached re-run < 0.5 s.

The simulator runs in a process of its own (``--simulator process``, the default), as a real
server does; ``--simulator thread`` runs it inside the client's process, where it competes with
the client for the GIL (a few points of capacity, more under load). The machine's load still
moves the first figure: note ``load_avg_1m`` with it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlmrel.bench import loadavg


def _images(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class _SimulatorProcess:
    """The simulator in a child process (spawned): ``openai_url``, ``stats()``, ``reset_stats()``.

    Commands and counters go over a ``multiprocessing`` pipe; the child stops when the pipe
    closes or on ``stop``.
    """

    def __init__(self, config: Any) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_simulator, args=(child, config), daemon=True)
        self._proc.start()
        child.close()
        self.openai_url: str = self._conn.recv()

    def _ask(self, command: str) -> Any:
        self._conn.send(command)
        return self._conn.recv()

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset_stats(self) -> None:
        self._ask("reset")

    def __enter__(self) -> _SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._ask("stop")
        except (BrokenPipeError, EOFError, OSError):
            pass
        self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


def _serve_simulator(conn: Any, config: Any) -> None:
    """Child process of :class:`_SimulatorProcess`: serve until told to stop."""
    from vlmrel.vlm.simulator import Simulator

    with Simulator(config) as sim:
        conn.send(sim.openai_url)
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command == "stats":
                conn.send(sim.stats())
            elif command == "reset":
                sim.reset_stats()
                conn.send(None)
            else:
                conn.send(None)
                return


def seed_loop(base_url: str, model: str, images: list[np.ndarray], timeout: float) -> dict[str, Any]:
    """Seed 004's sequential loop: one blocking chat completion per image."""
    from openai import OpenAI

    from vlmrel.teacher.schema import annotation_prompt

    client = OpenAI(base_url=base_url, api_key="dummy", timeout=timeout, max_retries=0)
    ok = failed = 0
    t0 = time.perf_counter()
    for arr in images:
        url = "data:image/png;base64," + base64.b64encode(_png(arr)).decode()
        try:
            resp = client.chat.completions.create(
                model=model,
                temperature=0,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": annotation_prompt()},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                ],
            )
            json.loads(resp.choices[0].message.content or "")
            ok += 1
        except Exception:  # the seed logged and went on
            failed += 1
    wall = time.perf_counter() - t0
    client.close()
    return {"requests": len(images), "ok": ok, "failed": failed, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmrel.bench vlm", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.2, help="simulated seconds per request")
    parser.add_argument("--slots", type=int, default=8, help="requests the simulator serves at once")
    parser.add_argument(
        "--sequential-n", type=int, default=50, help="requests of the seed's loop (its total is extrapolated)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--simulator",
        choices=["process", "thread"],
        default="process",
        help="run the simulator in its own process (like a real server) or in a thread of this one",
    )
    args = parser.parse_args(argv)

    from vlmrel import vlm
    from vlmrel.teacher.schema import ANNOTATION_SCHEMA, annotation_prompt
    from vlmrel.vlm.config import SimulatorConfig
    from vlmrel.vlm.simulator import Simulator

    n = args.requests
    capacity = args.slots / args.latency
    images = _images(n, args.seed)
    sim_cfg = SimulatorConfig(
        enabled=True, latency_s=args.latency, max_concurrency=args.slots, overload="queue"
    )
    out: dict[str, Any] = {
        "requests": n,
        "latency_s": args.latency,
        "slots": args.slots,
        "capacity_req_per_s": capacity,
    }
    server = _SimulatorProcess(sim_cfg) if args.simulator == "process" else Simulator(sim_cfg)
    out["simulator"] = args.simulator
    with server as sim, tempfile.TemporaryDirectory(prefix="vlmrel-bench-") as tmp:
        seq_n = max(1, min(args.sequential_n, n))
        seq = seed_loop(sim.openai_url, "bench-sim", images[:seq_n], timeout=30)
        seq_tp = seq["requests"] / seq["wall_s"]
        out["seed_loop"] = {
            **seq,
            "throughput_req_per_s": seq_tp,
            "fraction_of_capacity": seq_tp / capacity,
            "extrapolated_wall_s_all": n / seq_tp,
        }
        cfg = vlm.VLMConfig.from_dict(
            {
                "backend": "openai",
                "model": "bench-sim",
                "endpoints": [sim.openai_url],
                "concurrency": args.slots,
                "timeout_s": 30,
                "cache_path": str(Path(tmp) / "cache.sqlite"),
            }
        )
        reqs = [
            vlm.Request(prompt=annotation_prompt(), image=arr, schema=ANNOTATION_SCHEMA) for arr in images
        ]
        sim.reset_stats()
        t0 = time.perf_counter()
        res = vlm.run_requests(cfg, reqs, progress=False)
        wall = time.perf_counter() - t0
        tp = n / wall
        st = sim.stats()
        out["vlmrel"] = {
            "wall_s": wall,
            "ok": sum(r.ok for r in res),
            "failed": sum(not r.ok for r in res),
            "throughput_req_per_s": tp,
            "fraction_of_capacity": tp / capacity,
            "server_requests": st["requests"],
            "server_peak_concurrency": st["peak_processing"],
            "server_slot_s_per_request": st["slot_s"] / max(1, st["requests"]),
            "server_slot_utilization": st["slot_s"] / (wall * args.slots),
        }
        sim.reset_stats()
        t0 = time.perf_counter()
        res2 = vlm.run_requests(cfg, reqs, progress=False)
        cached = time.perf_counter() - t0
        out["cached"] = {
            "wall_s": cached,
            "cache_hits": sum(r.cache_hit for r in res2),
            "server_requests": sim.stats()["requests"],
            "same_answers": [r.parsed for r in res] == [r.parsed for r in res2],
        }
    out["throughput_req_per_s"] = tp
    out["fraction_of_capacity"] = tp / capacity
    out["speedup_vs_seed_loop"] = tp / seq_tp
    out["cached_rerun_s"] = cached
    out["load_avg_1m"] = (loadavg() or [None])[0]
    out["targets"] = {
        "fraction_of_capacity_ge_0.95": tp / capacity >= 0.95,
        "cached_rerun_lt_0.5s": cached < 0.5,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"capacity {capacity:.1f} req/s ({args.slots} slots / {args.latency} s)\n"
            f"seed loop: {seq_tp:.2f} req/s ({seq['requests']} requests in {seq['wall_s']:.1f} s; "
            f"{n} would take {n / seq_tp:.0f} s)\n"
            f"vlmrel:    {tp:.2f} req/s = {tp / capacity:.1%} of capacity ({n} in {wall:.2f} s), "
            f"{tp / seq_tp:.1f}x the seed loop\n"
            f"cached re-run of {n}: {cached:.3f} s ({out['cached']['cache_hits']} cache hits, "
            f"{out['cached']['server_requests']} sent)"
        )
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
