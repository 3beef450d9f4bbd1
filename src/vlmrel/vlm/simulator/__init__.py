"""An HTTP **simulator** of VLM servers for tests, benchmarks and the demo. It is not a model.

It speaks the OpenAI API (``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``GET /v1/models``) and the Ollama API (``POST /api/chat``, ``POST /api/embed``,
``GET /api/tags``, ``GET /api/version``) on 127.0.0.1 only, and answers from *metadata*,
never by looking at an image the way a model would:

- **Which image?** Every image it receives is matched against a registry by a
  perturbation-tolerant fingerprint (a 32x32 grey thumbnail, z-scored, compared by
  correlation, plus the aspect ratio). The registry holds the real photos that ship in the
  scikit-image and scikit-learn wheels (the demo images, with hand-written annotations and
  boxes) and whatever metadata files are passed with ``--metadata`` (the grounding demo
  registers its generated scenes and their true boxes that way).
- **Annotation prompts** (a schema or prompt with ``scene``/``objects``) get the
  registered annotation in the seed-004 format. Unknown images get a deterministic guess
  from their statistics (bright, unsaturated pages become documents, and so on).
- **Grounding prompts** (a schema with ``bbox_2d`` or a prompt asking for a bounding box;
  the expression is the first double-quoted phrase) get the registered box in Qwen3-VL
  relative 0-1000 coordinates (or absolute pixels with ``--coords absolute``, like
  Qwen2.5-VL), jittered by a seeded amount that grows with how far the image's statistics
  (brightness, contrast, correlation, sharpness) moved from the registered original, so
  perturbed images give worse boxes and the grounding chain gets boundary samples.
  Unknown images get the box of their most salient region.
- **Embeddings** are hashed character-trigram vectors: deterministic, and similar
  texts get similar vectors.

Answers are deterministic: the same request gets the same answer on every run.

Faults are injected with a seeded probability per kind (``timeout``, ``http_429``,
``http_500``, ``http_503``, ``http_400``, ``malformed_json``, ``schema_violation``,
``truncated``, ``malformed_body``), drawn from a generator seeded by (seed, request hash,
attempt number), where the attempt number counts how often this simulator (or the group
started together by :func:`simulated`) has seen the same request. ``--faults-max-attempt
N`` limits faults to the first N attempts. ``--max-concurrency`` caps requests handled at
once: ``--overload queue`` makes the rest wait (like vLLM and Ollama), ``reject`` answers
429/503. A request holds its slot for its latency, answer included (the answer is worked out
while the latency runs). The simulator records requests, faults, the peak number of
concurrent requests (in the server, and holding a slot) and the slot-seconds used.

Layout: :mod:`.demo` (the demo photos' metadata), :mod:`.registry` (fingerprints, matching,
metadata files), :mod:`.answers` (the answer to a request, from the request alone plus that
metadata), :mod:`.server` (HTTP, faults, :func:`simulated`), ``__main__`` (command line).
It imports no chain: it answers from the JSON schema and prompt in the request, as a real
server would.

Run it as ``python -m vlmrel.vlm.simulator --port 11434 --latency 0.05 --faults
http_429=0.05,timeout=0.01 --metadata scenes.json`` or in-process with
``with Simulator(...) as sim: sim.url``.
"""

from .answers import answer_chat, embed_texts
from .registry import SIM_VERSION, Entry, Fingerprint, Registry, drift, fingerprint, write_metadata
from .server import Simulator, simulated, simulator_salt

__all__ = [
    "SIM_VERSION",
    "Entry",
    "Fingerprint",
    "Registry",
    "Simulator",
    "answer_chat",
    "drift",
    "embed_texts",
    "fingerprint",
    "simulated",
    "simulator_salt",
    "write_metadata",
]
