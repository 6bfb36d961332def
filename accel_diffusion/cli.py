"""The ``accel-diffusion`` command: generate, models, strategies, train, eval."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from accel_diffusion.errors import AccelDiffusionError, InvalidRequestError
from accel_diffusion.jsonbody import parse_json
from accel_diffusion.strategy import DEFAULT_LIMITS
from accel_diffusion.third_party_output import quiet_third_party_output


def _fail(error: AccelDiffusionError | str) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


class _CleanErrors(click.Group):
    """Reports AccelDiffusionError as one line (field, message, allowed values), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AccelDiffusionError as exc:
            _fail(exc)


def _json_arg(value: str | None, field: str) -> Any:
    """A JSON object given inline, as ``@file.json``, as a path to a .json file, or a bare name."""
    if value is None:
        return None
    text = value
    if value.startswith("@") or value.endswith(".json"):
        path = Path(value.removeprefix("@"))
        if not path.is_file():
            raise InvalidRequestError(field, f"file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(field, f"file {str(path)!r} is not UTF-8 text") from None
    if text.lstrip().startswith("{"):
        return parse_json(text, field)
    return text


def _strategy_from_options(strategy: str | None, guidance_scale: float | None = None, **components: str | None) -> Any:
    """One Strategy from --strategy plus per-kind overrides (--sampler, --schedule, --guidance, --guidance-scale)."""
    from accel_diffusion.strategy import Strategy, merge_guidance_scale

    data = _json_arg(strategy, "strategy") or {}
    if data == "auto" and not any(v is not None for v in components.values()):
        return Strategy.parse(merge_guidance_scale(data, guidance_scale))
    if not isinstance(data, dict):
        raise InvalidRequestError("strategy", "must be a JSON object such as {\"sampler\": {\"name\": \"ddim\"}}")
    for kind, value in components.items():
        if value is not None:
            data[kind] = _json_arg(value, f"strategy.{kind}")
    return Strategy.parse(merge_guidance_scale(data, guidance_scale))  # both a guidance and a scale: an error


def _registry(ctx: click.Context) -> Any:
    from accel_diffusion.models.registry import ModelRegistry

    return ModelRegistry.from_file(ctx.obj.get("models_file"))


@click.group(cls=_CleanErrors)
@click.option("--models", "models_file", type=click.Path(dir_okay=False), default=None,
              help="Model registry TOML file (default: $ACCEL_DIFFUSION_MODELS, else the built-in models).")
@click.version_option(package_name="accel-diffusion")
@click.pass_context
def main(ctx: click.Context, models_file: str | None) -> None:
    """accel-diffusion: faster diffusion generation with interchangeable acceleration strategies."""
    ctx.ensure_object(dict)
    ctx.obj["models_file"] = models_file


@main.command()
@click.option("--model", "-m", default="shapes", show_default=True, help="Model id from the registry.")
@click.option("--prompt", "-p", "prompts", multiple=True, help="Prompt (repeat for several).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="One prompt per line.")
@click.option("--negative-prompt", default=None)
@click.option("-n", "--n", "n", type=int, default=None, help="Images per prompt (default 1).")
@click.option("--num-images-per-prompt", type=int, default=None, help="diffusers' name of -n.")
@click.option("--seed", type=int, default=None, help="Seed of the first image; image k uses seed + k.")
@click.option("--size", default=None, help='"WxH", e.g. 512x512 (or --width and --height; default: the model\'s).')
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option("--num-inference-steps", type=int, default=None, help="diffusers' name of --steps.")
@click.option("--strategy", default=None, help="Strategy as JSON, @file.json or a .json path; or 'auto' with "
              "--latency-budget-ms (the best point of the model's Pareto profile on this device).")
@click.option("--latency-budget-ms", type=float, default=None, help="With --strategy auto: time per image to fit.")
@click.option("--min-quality", type=float, default=None, help="With --strategy auto: least quality (profile metric).")
@click.option("--sampler", default=None, help='Sampler name or JSON, e.g. ddim or {"name":"ddim","eta":0}.')
@click.option("--schedule", default=None, help="Schedule name or JSON.")
@click.option("--guidance", default=None, help="Guidance name or JSON.")
@click.option("--guidance-scale", type=float, default=None,
              help="Shorthand for --guidance '{\"name\":\"cfg\",\"scale\":S}'.")
@click.option("--init-image", type=click.Path(dir_okay=False), default=None, help="img2img: start from this image.")
@click.option("--strength", type=float, default=0.8, show_default=True, help="img2img: how much to change.")
@click.option("--vae", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="Autoencoder: the pipeline's VAE, or the model's tiny TAESD-style one (faster, approximate).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="outputs", show_default=True)
@click.option("--batch-size", type=click.IntRange(1, DEFAULT_LIMITS.max_images), default=16, show_default=True,
              help="Images per engine call.")
@click.option("--engine-acceleration", type=click.Choice(["none", "compile"]), default="none", show_default=True,
              help="compile: build the UNet and decode as static-shape graphs for this run's batch sizes first "
                   "(tens of seconds per graph on a CPU, seconds from a warm --inductor-cache-dir), then generate. "
                   "Off by default here, unlike the server's: a one-off run would pay minutes of compilation to "
                   "save a fraction of seconds of generation; it pays for long runs with a kept cache.")
@click.option("--inductor-cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where torch inductor keeps compiled kernels (a second run with the same one starts warm).")
@click.option("--ar-iterations", type=int, default=None,
              help="Autoregressive models (shapes_mar): AR iterations (default: the model's).")
@click.pass_context
def generate(ctx: click.Context, model: str, prompts: tuple[str, ...], prompts_file: str | None,
             negative_prompt: str | None, n: int | None, num_images_per_prompt: int | None, seed: int | None,
             size: str | None, width: int | None, height: int | None, steps: int | None,
             num_inference_steps: int | None, strategy: str | None, sampler: str | None, schedule: str | None,
             guidance: str | None, guidance_scale: float | None, init_image: str | None, strength: float,
             vae: str, out_dir: str, batch_size: int, latency_budget_ms: float | None,
             min_quality: float | None, engine_acceleration: str, inductor_cache_dir: str | None,
             ar_iterations: int | None) -> None:
    """Generate images into OUT (PNG files plus results.json)."""
    from tqdm import tqdm

    from accel_diffusion.engine import Engine, GenerationHooks
    from accel_diffusion.strategy import GenerationRequest
    from accel_diffusion.vocabulary import errors_named_as_sent, to_canonical

    # the diffusers/OpenAI spellings are aliases: one of each pair, and errors name the one given
    sizes, sent = to_canonical({"n": n, "num_images_per_prompt": num_images_per_prompt, "size": size, "width": width,
                                "height": height, "steps": steps, "num_inference_steps": num_inference_steps})
    n = 1 if sizes["n"] is None else sizes["n"]
    width, height, steps = sizes["width"], sizes["height"], sizes["steps"]

    all_prompts = list(prompts)
    if prompts_file:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError("prompts_file", "is not UTF-8 text (one prompt per line)") from None
        all_prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not all_prompts:
        raise InvalidRequestError("prompt", "give at least one --prompt or a --prompts-file")
    if n < 1:
        raise InvalidRequestError(sent.get("n", "n"), f"must be at least 1, got {n}", ">= 1")
    parsed_strategy = _strategy_from_options(strategy, guidance_scale, sampler=sampler, schedule=schedule,
                                             guidance=guidance)

    # Validate every chunk before generating anything, so a bad request writes nothing.
    base_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    jobs = [(p, k) for p in all_prompts for k in range(n)]
    requests = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        with errors_named_as_sent(sent):  # a bad --size names size, not width (so do the engine's errors)
            requests.append(GenerationRequest.create(
                model=model, prompt=[p for p, _ in chunk], n=1, seed=base_seed + start,
                negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                strategy=parsed_strategy, init_image=init_image, strength=strength, vae=vae,
                latency_budget_ms=latency_budget_ms, min_quality=min_quality, ar_iterations=ar_iterations,
            ))
    from accel_diffusion.engine import compiled

    compiled.set_cache_dir(inductor_cache_dir)
    images_per_call = sorted({r.num_images for r in requests})
    unet_rows = sorted({k * branches for k in images_per_call for branches in (1, 2)})
    engine = Engine(_registry(ctx), acceleration=engine_acceleration,  # type: ignore[arg-type]
                    buckets=sorted({*unet_rows, *images_per_call}))
    engine.models.spec(model)
    quiet_third_party_output()
    click.echo(f"loading {model}…", err=True)
    loaded = engine.models.get(model)
    click.echo(f"loaded {model} in {loaded.load_seconds:.1f} s ({loaded.device}, "
               f"{str(loaded.dtype).removeprefix('torch.')})", err=True)
    if engine_acceleration == "compile" and loaded.family in ("sd", "sdxl"):
        loaded.compiled_model(engine.buckets)
        first = requests[0]
        vaes = [loaded.tiny_vae if vae == "tiny" else loaded.pipeline.vae]
        with errors_named_as_sent(sent):
            w, h = (first.width, first.height) if first.init_image is None else (None, None)
            click.echo(f"compiling {model}: UNet rows {unet_rows}, decode rows {images_per_call}…", err=True)
            graphs = compiled.warm(loaded, w, h, vaes, unet_rows=unet_rows, decode_rows=images_per_call)
        click.echo(f"compiled {len(graphs)} graphs in {sum(g['seconds'] for g in graphs):.1f} s", err=True)
    results = []
    with errors_named_as_sent(sent), tqdm(total=len(jobs), desc="images", unit="img") as images_bar:
        for request in requests:
            with tqdm(desc="steps", unit="step", leave=False) as bar:
                def on_step(event: Any, bar: Any = bar) -> None:
                    bar.total = event.total
                    bar.update(1)

                results.append(engine.generate(request, GenerationHooks(on_step=on_step)))
            images_bar.update(request.num_images)
    out = Path(out_dir)
    written = _write_results(out, results)
    click.echo(f"wrote {len(written)} image(s) to {out}/ (results.json has seeds, strategy, NFE, timings)")


def _write_results(out: Path, results: list[Any]) -> list[Path]:
    """Write PNGs and results.json atomically (temporary file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    records = []
    index = 0
    for result in results:
        for image, prompt, seed in zip(result.to_pil(), result.prompts, result.seeds):
            path = out / f"{index:04d}_seed{seed}.png"
            _atomic_write(path, lambda f, image=image: image.save(f, format="PNG"))
            written.append(path)
            records.append({"file": path.name, "prompt": prompt, "seed": seed})
            index += 1
    summary = {"images": records, "runs": [r.summary() for r in results]}
    _atomic_write(out / "results.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    return written


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the models of the registry."""
    registry = _registry(ctx)
    rows = []
    for model_id in registry.ids():
        spec = registry.spec(model_id)
        location = spec.location()
        rows.append({
            "id": model_id, "source": spec.source, "location": location,
            "available": spec.source == "hub" or Path(location).is_dir(),
            "default_steps": spec.default_steps,
            "default_strategy": spec.default_strategy.model_dump(exclude_none=True),
            "description": spec.description,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        status = "" if row["available"] else "  [missing: train it first]"
        click.echo(f"{row['id']}  ({row['source']}: {row['location']}){status}")
        click.echo(f"    {row['description']}")
        click.echo(f"    default: {row['default_steps']} steps, {json.dumps(row['default_strategy'])}")


@main.command()
@click.option("--kind", type=click.Choice(["sampler", "schedule", "guidance", "student", "runtime"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print each component's JSON Schema.")
def strategies(kind: str | None, as_json: bool) -> None:
    """List strategy components with their parameters."""
    from accel_diffusion.registry import get_registry

    infos = [i for i in get_registry().all() if kind is None or i.kind.value == kind]
    if as_json:
        click.echo(json.dumps({f"{i.kind.value}:{i.name}": i.json_schema() for i in infos}, indent=2))
        return
    current = None
    for info in infos:
        if info.kind != current:
            current = info.kind
            click.echo(f"{info.kind.value}:")
        click.echo(f"  {info.name} — {info.summary}")
        for p in info.parameters():
            default = "required" if p["required"] else f"default {json.dumps(p['default'])}"
            limits = ", ".join(f"{k} {v}" for k, v in p["constraints"].items())
            click.echo(f"      {p['name']}: {p['type']} ({default}{'; ' + limits if limits else ''})")


# what `accel-diffusion train TARGET` runs: (module, training function)
TRAINERS = {
    "shapes": ("accel_diffusion.models.shapes.train", "train_shapes"),
    "judge": ("accel_diffusion.eval.shapes_judge", "train_judge"),
    "shapes_tiny_vae": ("accel_diffusion.models.shapes.train_tiny_vae", "train_shapes_tiny_vae"),
    "shapes_mar": ("accel_diffusion.ar.train", "train_shapes_mar"),
}


@main.command()
@click.argument("target", type=click.Choice(sorted(TRAINERS)))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def train(target: str, out_dir: str, seed: int) -> None:
    """Train a built-in model into OUT: `shapes` (the text-to-image model), `judge`, `shapes_tiny_vae`
    (a TAESD-style tiny autoencoder distilled from the shipped `shapes` VAE), or `shapes_mar` (the
    masked-autoregressive model with a diffusion head; resumes from OUT.work/checkpoint.pt)."""
    import importlib

    module, function = TRAINERS[target]
    quiet_third_party_output()
    info = getattr(importlib.import_module(module), function)(out_dir, seed=seed)
    click.echo(json.dumps(info, indent=2, default=str))


@main.command()
@click.option("--method", type=click.Choice(["fdistill", "disback", "slimflow"]), required=True)
@click.option("--teacher", default="gmm", show_default=True, help="The model to distil (gmm or shapes: every method).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--iterations", type=click.IntRange(min=1), default=1500, show_default=True, help="Training budget.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--divergence", default="js", show_default=True, help="fdistill: rkl, sf, js, sh, kl, jf or neyman.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted run from OUT/training_state.")
def distill(method: str, teacher: str, out_dir: str, iterations: int, seed: int, divergence: str,
            resume: bool) -> None:
    """Distil a one-step student of TEACHER into OUT (a model directory with a model card)."""
    from accel_diffusion.students.distill import distill as run_distill

    quiet_third_party_output()
    info = run_distill(method, teacher, out_dir, iterations=iterations, seed=seed, divergence=divergence,
                       resume=resume)
    click.echo(json.dumps(info, indent=2, default=str))


@main.command("eval")
@click.option("--model", "-m", default="shapes", show_default=True)
@click.option("--steps", type=int, default=None)
@click.option("--num-inference-steps", type=int, default=None, help="diffusers' name of --steps.")
@click.option("--strategy", default=None, help="Strategy as JSON, @file.json or a .json path.")
@click.option("--guidance-scale", type=float, default=None)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per shape/colour/background combination.")
@click.option("--batch-size", type=click.IntRange(min=1), default=49, show_default=True)
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None, help="Write the metrics as JSON.")
@click.pass_context
def eval_command(ctx: click.Context, model: str, steps: int | None, num_inference_steps: int | None,
                 strategy: str | None, guidance_scale: float | None, seed: int, repeats: int, batch_size: int,
                 out_file: str | None) -> None:
    """Measure a model on `shapes` prompts: prompt accuracy, Fréchet distance, saturation, NFE, time."""
    from accel_diffusion.engine import Engine
    from accel_diffusion.vocabulary import errors_named_as_sent, to_canonical

    canonical, sent = to_canonical({"steps": steps, "num_inference_steps": num_inference_steps})
    steps = canonical["steps"]

    try:
        from accel_diffusion.eval.shapes_eval import evaluate_shapes
    except ImportError as exc:
        _fail(f"eval needs the 'eval' extra ({exc.name} is missing): pip install 'accel-diffusion[eval]'")
    quiet_third_party_output()
    engine = Engine(_registry(ctx))
    with errors_named_as_sent(sent):
        metrics = evaluate_shapes(engine, model=model, strategy=_strategy_from_options(strategy, guidance_scale),
                                  steps=steps, seed=seed, repeats=repeats, batch_size=batch_size)
    text = json.dumps(metrics, indent=2)
    if out_file:
        Path(out_file).write_text(text + "\n")
    click.echo(text)


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="server settings TOML ([server] table); ACCEL_DIFFUSION_* environment variables override it")
@click.option("--host", default=None, help="bind address (default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (default 8000)")
@click.option("--model", "served", multiple=True, help="model id to serve (repeatable; default: shapes)")
@click.option("--role", type=click.Choice(["all", "api", "worker"]), default=None,
              help="with queue_backend = 'redis': api (queue and answer jobs, no model), worker (run queued jobs) "
                   "or all (default)")
@click.pass_context
def serve(ctx: click.Context, config_file: str | None, host: str | None, port: int | None,
          served: tuple[str, ...], role: str | None) -> None:
    """Run the HTTP server (OpenAI-compatible images API + jobs API) with uvicorn."""
    try:
        from accel_diffusion.server import ServerSettings
        from accel_diffusion.server.process import serve as run_server
    except ImportError as exc:
        _fail(f"the server needs its extra: pip install 'accel-diffusion[server]' ({exc.name} is missing)")
        return
    overrides: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port), ("role", role)) if v is not None}
    if served:
        overrides["served_models"] = list(served)
    if ctx.obj.get("models_file"):
        overrides["models_file"] = ctx.obj["models_file"]
    try:
        settings = ServerSettings.from_file(config_file, **overrides)
    except ValueError as exc:
        _fail(f"server settings: {exc}")
        return
    quiet_third_party_output()
    run_server(settings)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="output folder (images/, results/, results.jsonl, errors.jsonl)")
@click.option("--local", "local", is_flag=True, help="run on the engine in this process (the default)")
@click.option("--server", "server_url", default=None, help="run against this server, e.g. http://127.0.0.1:8000")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
              help="requests in flight against the server")
@click.option("--api-key", default=None, help="server API key (default: $ACCEL_DIFFUSION_API_KEY)")
@click.option("--shard-index", type=click.IntRange(0), default=None,
              help="this shard (default: $JOB_COMPLETION_INDEX, as in a Kubernetes Indexed Job; else 0)")
@click.option("--num-shards", type=click.IntRange(1), default=None,
              help="number of shards (default: $ACCEL_DIFFUSION_NUM_SHARDS, else 1)")
@click.option("--model", "-m", "default_model", default=None,
              help="model of lines that name none (default: the registry's first, or the server's default)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.pass_context
def batch(ctx: click.Context, manifest: str, out_dir: str, local: bool, server_url: str | None, concurrency: int,
          api_key: str | None, shard_index: int | None, num_shards: int | None, default_model: str | None,
          quiet: bool) -> None:
    """Run a JSONL MANIFEST (one request per line) into OUT; a rerun skips finished requests.

    Exit code 0 when every request of this shard succeeded, 1 when a line was invalid or a request
    failed (see errors.jsonl), 2 on a usage error.
    """
    from accel_diffusion.batch import LocalBackend, ServerBackend, run_batch

    if local and server_url:
        _fail("give either --local or --server URL")
    shard_index = shard_index if shard_index is not None else (_env_int("JOB_COMPLETION_INDEX") or 0)
    num_shards = num_shards if num_shards is not None else (_env_int("ACCEL_DIFFUSION_NUM_SHARDS") or 1)
    if shard_index >= num_shards:
        _fail(f"shard index {shard_index} is not below the number of shards {num_shards}")
    backend: Any
    if server_url:
        try:
            backend = ServerBackend(server_url, concurrency, api_key)
        except ImportError as exc:
            _fail(f"--server needs the client extra: pip install 'accel-diffusion[client]' ({exc.name} is missing)")
            return
    else:
        quiet_third_party_output()
        backend = LocalBackend(ctx.obj.get("models_file"))
    try:
        report = run_batch(manifest, out_dir, backend, shard_index, num_shards, progress=not quiet,
                           default_model=default_model)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    shard = f" (shard {shard_index} of {num_shards})" if num_shards > 1 else ""
    click.echo(f"{report.requests} requests{shard}: {report.generated} generated, {report.already_done} already "
               f"done, {report.duplicates} duplicate lines, {report.failed} failed, {report.invalid} invalid lines; "
               f"{report.images} images in {report.wall_s:.1f} s ({report.images_per_s:.2f} images/s)", err=True)
    for error in sorted(report.errors, key=lambda e: e["line"])[:20]:
        click.echo(f"  line {error['line']}: {error.get('field') or error.get('type')}: {error['message']}", err=True)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()


# `accel-diffusion search` (AutoDiffusion) lives beside the search it runs
from accel_diffusion.schedules.search_command import search_command  # noqa: E402

main.add_command(search_command)

# `accel-diffusion bench pareto` lives beside the sweep it runs
from accel_diffusion.pareto.bench_command import bench_command  # noqa: E402

main.add_command(bench_command)
