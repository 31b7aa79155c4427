"""`skillpack serve`: run the OpenAI-compatible server (every option also reads SKILLPACK_* env vars)."""
from __future__ import annotations

import argparse
import logging
import sys

# option -> help; the Settings field is the option name with dashes as underscores
OPTIONS = {
    "--base": "base model checkpoint folder (default: SmolLM2-135M-Instruct, converted on first use)",
    "--packs": "pack store folder; created if missing (default: ./packs)",
    "--host": "address to listen on (default: 127.0.0.1)",
    "--port": "port to listen on (default: 8000)",
    "--device": "auto, cpu, cuda or cuda:N (default: auto)",
    "--dtype": "auto, float32, float16 or bfloat16 (default: auto)",
    "--max-batch": "most requests in one running batch",
    "--max-model-len": "most tokens per sequence, prompt and reply together",
    "--pack-cache-bytes": "memory budget for loaded packs, in bytes",
    "--admin-token": "bearer token for /admin routes (or SKILLPACK_ADMIN_TOKEN)",
    "--api-key": "bearer token required on /v1 routes (or SKILLPACK_API_KEY); none by default",
}


def configure(parser: argparse.ArgumentParser) -> None:
    for option, help_text in OPTIONS.items():
        parser.add_argument(option, default=None, help=help_text)
    parser.add_argument("--no-admin-auth", action="store_true", default=None,
                        help="run the admin routes without a token (only on a trusted network)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--ray", action="store_true",
                        help="run as Ray Serve replicas routed by pack (needs the `ray` extra; docs/SCALE.md)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="with --ray: this many replicas (default: autoscale, SKILLPACK_RAY_* settings)")


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from skillpack_server.app import create_app
    from skillpack_server.settings import Settings

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("log_level", "ray", "replicas")}
    try:
        settings = Settings(**given)  # explicit options win; the rest come from the environment
        settings.packs.mkdir(parents=True, exist_ok=True)
        app = create_app(settings)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"skillpack serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replicas is not None and not args.ray:
        print("skillpack serve: --replicas needs --ray (one process serves one replica).", file=sys.stderr)
        return 2
    if args.ray:
        from skillpack_server.ray_serve import serve_on_ray

        return serve_on_ray(settings, replicas=args.replicas)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0
