"""`skillpack serve`: run the OpenAI-compatible server (every option also reads SKILLPACK_* env vars)."""
from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from skillpack_server.app import base_dir, create_app
from skillpack_server.auth import AdminTokenError, load_or_create_admin_token
from skillpack_server.engine.config import ConfigError
from skillpack_server.engine.engine import Engine
from skillpack_server.ray_serve import serve_on_ray
from skillpack_server.settings import PART_ENV_PREFIXES, Settings, env_name

# option -> help; the Settings field is the option name with dashes as underscores
OPTIONS = {
    "--base": "base model: a checkpoint folder or a Hugging Face model id ORG/NAME from the hub cache "
              "(default: SmolLM2-135M-Instruct, converted on first use)",
    "--packs": "pack store folder, where uploads go; created if missing "
               "(default: $XDG_DATA_HOME/skillpack/packs, i.e. ~/.local/share/skillpack/packs)",
    "--readonly-packs": "folders of packs served where they lie and never written, ':'-separated "
                        "(scripts/serve.sh passes the demo packs in packs/)",
    "--host": "address to listen on (default: 127.0.0.1)",
    "--port": "port to listen on (default: 8000)",
    "--device": "auto, cpu, cuda or cuda:N (default: auto)",
    "--dtype": "auto, float32, float16 or bfloat16 (default: auto)",
    "--max-batch": "most requests in one running batch",
    "--max-model-len": "most tokens per sequence, prompt and reply together (default: the model's limit)",
    "--kv-budget-tokens": "KV cache size in tokens (default: 2048 per batch row, at least --max-model-len)",
    "--pack-cache-bytes": "memory budget for loaded packs, in bytes",
    "--admin-token": "bearer token for /admin routes (or SKILLPACK_ADMIN_TOKEN; default: generated once "
                     "and kept in --admin-token-file)",
    "--admin-token-file": "where a generated admin token is kept, mode 0600 "
                          "(default: $XDG_CONFIG_HOME/skillpack/admin_token, i.e. ~/.config/skillpack/admin_token)",
    "--api-key": "bearer token required on /v1 routes (or SKILLPACK_API_KEY); none by default",
}
CLI_ONLY = ("log_level", "ray", "replicas")
SECRET_FIELDS = ("admin_token", "api_key")
SCALE_OPTIONS = ("replicas",)  # options that set a field of the settings' Ray scaling part


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


class StartupError(Exception):
    """A start-up problem the user can fix; printed as one line, then the command exits with 2."""


def where_to_change(field: str, part: str | None = None) -> str:
    """The option and environment variable of a settings field (`part`: its part of the tree)."""
    if part in (None, "engine") or field in SCALE_OPTIONS:
        return f"--{field.replace('_', '-')} or {env_name(part, field)}"
    return env_name(part, field)


def validation_message(exc) -> str:
    """A pydantic ValidationError of Settings as one line: each bad value, why, and where to change it."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        part = loc.pop(0) if loc and loc[0] in PART_ENV_PREFIXES else None
        field = loc[0] if loc else ""
        message = error["msg"].removeprefix("Value error, ")
        if field:
            given = error["input"]
            # a secret is not echoed into logs, even a rejected one
            shown = f"<{len(str(given))} characters>" if field in SECRET_FIELDS else given
            parts.append(f"{field}={shown}: {message} (set {where_to_change(field, part)})")
        else:
            parts.append(message)
    return "; ".join(parts)


def load_settings(args: argparse.Namespace):
    """Settings from the options given (explicit options win) and the environment."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in CLI_ONLY}
    scale = {k: v for k, v in vars(args).items() if v is not None and k in SCALE_OPTIONS}
    if scale:
        given["scale"] = scale
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise StartupError(validation_message(exc)) from None


def resolve_admin_token(settings) -> tuple[object, str]:
    """The settings with an admin token, and a sentence that says where it came from."""
    if settings.admin_token:
        return settings, "the admin token is the one you set (--admin-token or SKILLPACK_ADMIN_TOKEN)"
    if settings.no_admin_auth:
        return settings, "the admin routes need no token (--no-admin-auth)"
    try:
        token, created = load_or_create_admin_token(settings.admin_token_file)
    except AdminTokenError as exc:
        raise StartupError(f"{exc} (or set {where_to_change('admin_token')})") from None
    verb = "generated and saved in" if created else "read from"
    return settings.model_copy(update={"admin_token": token}), (
        f"admin token ({verb} {settings.admin_token_file}): {token}")


def build_engine_or_explain(settings):
    """The engine, built before the server binds: a bad setting or base is one line, not a traceback."""
    try:
        base = base_dir(settings)
    except (RuntimeError, ValueError, OSError) as exc:
        if settings.base is not None:  # a folder or model id that cannot be found: the resolver's sentence says which
            raise StartupError(f"{exc} (set {where_to_change('base')})") from None
        raise StartupError(f"the default base model is unavailable: {exc}") from None
    try:
        return Engine(base, settings.engine)
    except ConfigError as exc:
        raise StartupError(f"{exc} (set {where_to_change(exc.field)})") from None
    except (ValueError, OSError) as exc:
        raise StartupError(f"the base model {base} cannot be served: {exc} (set {where_to_change('base')})") from None


def ready_banner(settings, token_line: str) -> str:
    url = f"http://{settings.host}:{settings.port}"
    lines = [f"SkillPack Server is ready on {url} (OpenAI base_url {url}/v1)", f"  {token_line}",
             f"  uploads go to {settings.packs}"]
    lines += [f"  read-only packs from {folder}" for folder in settings.readonly_packs]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.replicas is not None and not args.ray:
            raise StartupError("--replicas needs --ray (one process serves one replica).")
        settings = load_settings(args)
        settings, token_line = resolve_admin_token(settings)
        settings.packs.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.ray:
            return serve_on_ray(settings)
        engine = build_engine_or_explain(settings)
    except StartupError as exc:
        print(f"skillpack serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the pack store folder cannot be made
        print(f"skillpack serve: {exc} (set {where_to_change('packs')})", file=sys.stderr)
        return 2
    return serve_engine(settings, engine, ready_banner(settings, token_line), args.log_level)


def serve_engine(settings, engine, banner: str, log_level: str) -> int:
    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # last, where it is seen: after uvicorn's own start-up lines
                print(banner, flush=True)

    app = create_app(settings, engine_factory=lambda _: engine)
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level))
    server.run()
    return 0 if server.started else 1
