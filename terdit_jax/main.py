"""Command line: python -m terdit_jax.main [--config PATH] [--workdir DIR] [--mode MODE] [--config.KEY=VALUE ...]

With no flags it runs the embedded demo (configs/demo.py): train a small TerDiT on real digits, then
write a labelled sample grid. This module parses flags and dispatches; the work lives elsewhere.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

import terdit_jax.configs as _configs
from terdit_jax.registry import Registry

_DEMO = os.path.join(os.path.dirname(_configs.__file__), "demo.py")

FLAGS = flags.FLAGS


def _define_flags():
    # config_flags reads the --config.KEY overrides from sys.argv while defining the flag, so a misspelled key
    # fails here; cli() turns that into one message.
    config_flags.DEFINE_config_file("config", _DEMO, "ml_collections config file (get_config()).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints/, samples/, metrics.jsonl). "
                        "Default: runs/<config name>.")
    flags.DEFINE_enum("mode", "train", MODES.names(), "What to do: " + ", ".join(MODES.names()))
    flags.DEFINE_string("out", None, "export/export_orbax: output directory (default <workdir>/packed or "
                        "<workdir>/export_orbax); encode_prompts: the .npz (default <workdir>/captions/<prompts>.npz)")
    flags.DEFINE_bool("overwrite", False, "export / quantize / encode_prompts: replace an existing output")


def _bad_flags(e: BaseException):
    msg = " ".join(str(e.args[0] if e.args else e).replace("\\'", "'").split())
    if "Did you mean" in msg:  # ml_collections: "'stepz' Did you mean "steps" instead of "stepz"?"
        want, got = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', msg).groups()
        msg = f"the config has no field '{got}' (did you mean '{want}'?)"
    elif isinstance(e, (KeyError, AttributeError)):
        msg = f"the config has no field '{msg.strip(chr(34) + chr(39))}'"
    elif "No such file" in msg or "Failed loading config" in msg:
        msg = "could not load the config file: " + msg.split("Attempted")[-1].strip()
    print(f"error: {msg}\nusage: python -m terdit_jax.main [--config PATH] [--workdir DIR] [--mode MODE] "
          "[--config.KEY=VALUE ...]", file=sys.stderr)
    sys.exit(2)


def _parse(argv):
    try:
        rest = FLAGS(argv)
        FLAGS.config.to_dict()  # loads the config file now, so a missing or broken file is reported here
        return rest
    except flags.Error as e:
        _bad_flags(e)
    except (OSError, KeyError, AttributeError, TypeError, ValueError, SyntaxError) as e:
        _bad_flags(e)


def _say(msg: str):
    print(msg, flush=True)


def _check_workdir(workdir: str):
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to workdir {workdir!r} ({e.strerror}); pass a writable --workdir") from e


def _train(config, workdir: str, out_dir: str | None, overwrite: bool):
    from terdit_jax.train import run_train_mode
    run_train_mode(config, workdir, log=_say)


def _sample(config, workdir: str, out_dir: str | None, overwrite: bool):
    from terdit_jax.sample import run_sample_mode
    paths = run_sample_mode(config, workdir, log=_say)
    _say(f"sample grid: {paths['grid']}\nsamples npz: {paths['npz']}")


def _eval(config, workdir: str, out_dir: str | None, overwrite: bool):
    from terdit_jax.eval.run import run_eval_mode
    report = run_eval_mode(config, workdir, log=_say)
    _say(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=1))
    _say(f"report: {report['report']}")


def _export(config, workdir: str, out_dir: str | None, overwrite: bool):
    if config.sample.quantized:  # a post-training-quantized model → integer weights and matmuls
        from terdit_jax.ptq.deploy import export_deployed
        manifest = export_deployed(config, workdir, out_dir, overwrite=overwrite, log=_say)
        _say(f"sample from it with --mode sample --config.sample.packed_path={manifest['path']}")
        return
    from terdit_jax.export import export_packed
    out = out_dir or os.path.join(workdir, "packed")
    manifest = export_packed(config, workdir, out, step=config.sample.step, overwrite=overwrite)
    _say(f"packed checkpoint: {out} ({manifest['nbytes'] / 1e6:.1f} MB); sample from it with "
         f"--mode sample --config.sample.packed_path={out}")


def _export_orbax(config, workdir: str, out_dir: str | None, overwrite: bool):
    from terdit_jax.checkpoint import export_orbax
    out = export_orbax(config, workdir, out_dir or os.path.join(workdir, "export_orbax"), config.sample.step,
                       log=_say)
    _say(f"EMA inference checkpoint: {out}")


def _quantize(config, workdir: str, out_dir: str | None, overwrite: bool):
    from terdit_jax.ptq.run import run_quantize_mode
    run_quantize_mode(config, workdir, overwrite=overwrite, log=_say)


def _encode_prompts(config, workdir: str, out_dir: str | None, overwrite: bool):
    from terdit_jax.sample import run_encode_prompts_mode
    path = run_encode_prompts_mode(config, workdir, out_dir, overwrite=overwrite, log=_say)
    _say(f"caption embeddings: {path}; sample from them with --mode sample --config.sample.prompt_embeds={path}")


def _extract_latents(config, workdir: str, out_dir: str | None, overwrite: bool):
    from terdit_jax.data.latents import run_extract_mode
    manifest = run_extract_mode(config, log=_say)
    _say(f"latents: {config.data.path} ({manifest.get('num_records', '?')} records, complete: "
         f"{manifest.get('complete')}); train with --config.data.kind=imagenet_latents")


# --mode name → handler(config, workdir, --out, --overwrite); each does its work in the module it imports.
MODES: Registry[Callable] = Registry("mode", {
    "train": _train, "sample": _sample, "eval": _eval, "export": _export, "export_orbax": _export_orbax,
    "quantize": _quantize, "extract_latents": _extract_latents, "encode_prompts": _encode_prompts,
})


def run(config, workdir: str, mode: str):
    from terdit_jax.config import finalize

    config = finalize(config)
    _check_workdir(workdir)
    MODES.get(mode)(config, workdir, FLAGS.out, FLAGS.overwrite)


def main(argv):
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --flag=value")
    from terdit_jax.checkpoint import CheckpointError
    from terdit_jax.config import ConfigError
    from terdit_jax.data.captioned import CaptionFileError
    from terdit_jax.export import ExportError
    from terdit_jax.ptq.calibration import CalibrationError
    from terdit_jax.ptq.run import QuantizeError
    from terdit_jax.quant.sites import SiteError
    from terdit_jax.text.captions import CaptionError
    from terdit_jax.text.prompts import PromptError
    from terdit_jax.text.tokenizer import TokenizerError
    from terdit_jax.train import TrainingDiverged

    config = FLAGS.config
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    workdir = FLAGS.workdir or os.path.join("runs", name)
    try:
        from terdit_jax.parallel import initialize_distributed
        initialize_distributed(config)
        run(config, workdir, FLAGS.mode)
    except (ConfigError, CheckpointError, TrainingDiverged, ExportError, SiteError, QuantizeError, CalibrationError,
            CaptionError, CaptionFileError, PromptError, TokenizerError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli():
    try:
        _define_flags()
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        _bad_flags(e)
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    cli()
