"""``python -m vlmrel.vlm.simulator``: run the stand-in server until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import SIM_FAULTS, SimulatorConfig
from .server import Simulator


# -- command line --------------------------------------------------------------------------
def _parse_faults(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, _, p = item.partition("=")
        try:
            out[kind.strip()] = float(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"fault {item!r}: expected KIND=PROBABILITY") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlmrel.vlm.simulator",
        description="vlmrel VLM server SIMULATOR (not a model): OpenAI and Ollama APIs on 127.0.0.1, "
        "deterministic answers from image metadata, fault injection.",
    )
    parser.add_argument("--port", type=int, default=11434, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument(
        "--latency-jitter", type=float, default=0.0, help="sd of extra |normal| latency, seconds"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests handled at once")
    parser.add_argument("--overload", choices=["queue", "reject"], default="queue")
    parser.add_argument("--overload-status", type=int, choices=[429, 503], default=503)
    parser.add_argument(
        "--faults",
        type=_parse_faults,
        default={},
        help="e.g. http_429=0.05,timeout=0.01; kinds: " + ", ".join(SIM_FAULTS),
    )
    parser.add_argument(
        "--faults-max-attempt", type=int, default=None, help="inject faults only in the first N attempts"
    )
    parser.add_argument("--hang", type=float, default=600.0, help="seconds a 'timeout' fault hangs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metadata", action="append", default=[], help="metadata JSON (repeatable)")
    parser.add_argument("--coords", choices=["relative_1000", "absolute"], default="relative_1000")
    parser.add_argument("--grounding-sensitivity", type=float, default=1.0)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument(
        "--require-api-key-env", default=None, help="env variable holding the key clients must send"
    )
    args = parser.parse_args(argv)
    cfg = SimulatorConfig(
        enabled=True,
        latency_s=args.latency,
        latency_jitter_s=args.latency_jitter,
        max_concurrency=args.max_concurrency,
        overload=args.overload,
        overload_status=args.overload_status,
        faults=args.faults,
        faults_max_attempt=args.faults_max_attempt,
        hang_s=args.hang,
        seed=args.seed,
        metadata=tuple(args.metadata),
        coords=args.coords,
        grounding_sensitivity=args.grounding_sensitivity,
        embedding_dim=args.embedding_dim,
    )
    key = os.environ.get(args.require_api_key_env) if args.require_api_key_env else None
    sim = Simulator(cfg, port=args.port, require_api_key=key)
    print(
        f"vlmrel simulator (a simulator, not a model) on {sim.url} (Ollama) and {sim.openai_url} (OpenAI); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        sim._server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        sim._server.server_close()
        print(json.dumps(sim.stats()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
