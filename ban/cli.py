"""The `ban` command. Thin: parses arguments and calls library functions.

Why it is long (about 800 lines): one parser and one small function per command, each readable
on its own; they share nothing but `main`. The library is imported inside the commands, so that
`ban --help` and a mistyped flag answer at once instead of after importing torch.
"""

from __future__ import annotations

import argparse
import errno
import sys


def _add_info(commands) -> None:
    p = commands.add_parser("info", help="parameter count and FLOPs of a model configuration")
    p.add_argument(
        "--model",
        default="ban-8-vqa",
        help="a model preset, or a training recipe (its model); see `ban info --list`",
    )
    p.add_argument("--checkpoint", help="describe the model in this checkpoint instead")
    p.add_argument("--list", action="store_true", help="list the model presets and recipes")
    p.add_argument("--boxes", type=_positive, default=36, help="boxes per image for the FLOP count")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from ban import configs, presets
    from ban.checkpoint import load_any
    from ban.model import describe

    if args.list:
        print("model presets (ban info --model NAME; ban train --model NAME):")
        for name, config in presets.PRESETS.items():
            print(f"  {name}: {config}")
        print("training recipes (ban train --recipe NAME):")
        for name, recipe in configs.RECIPES.items():
            print(f"  {name}: task {recipe.task}, model {recipe.model}, {recipe.epochs} epochs")
        return 0
    if args.checkpoint:
        model = load_any(args.checkpoint)
    else:
        name = args.model
        if name not in presets.PRESETS and name in configs.RECIPES:  # a recipe: its model
            recipe = configs.RECIPES[name]
            config = presets.preset(recipe.model, **recipe.model_overrides)
        else:
            config = presets.preset(name)
        model = presets.build(config)
    print(describe(model, boxes=args.boxes))
    return 0


def _add_convert_official(commands) -> None:
    p = commands.add_parser(
        "convert-official", help="convert an original-release checkpoint to this project's format"
    )
    p.add_argument("input", help="a .pth file of the original release")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--dictionary", help="the release's dictionary.pkl (word list)")
    p.add_argument("--label2ans", help="the release's trainval_label2ans.pkl (answer list)")
    p.set_defaults(func=_run_convert_official)


def _run_convert_official(args) -> int:
    from ban.checkpoint import convert_official

    path = convert_official(
        args.input, args.output, dictionary=args.dictionary, label2ans=args.label2ans
    )
    print(f"wrote {path}")
    return 0


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train (and evaluate) a model; no arguments: ban-small on the built-in benchmark",
        description="Configuration: --recipe, then --config YAML, then flags and --set; "
        "the resolved config is saved in the run directory. Under torchrun every process runs "
        "this command.",
    )
    p.add_argument(
        "--recipe",
        help="training recipe: vqa-small (default), vqa-paper, flickr-small (default for "
        "--task flickr), flickr-paper; see `ban info --list`",
    )
    p.add_argument("--config", help="YAML file of training settings (may name a `recipe:`)")
    p.add_argument(
        "--task",
        choices=["vqa", "flickr"],
        help="vqa, or flickr (phrase grounding; default recipe flickr-small)",
    )
    p.add_argument("--protocol", choices=["any", "merged"], help="flickr: box protocol (any)")
    p.add_argument(
        "--compat",
        action="store_true",
        default=None,
        help="flickr: the release's phrase positions (first match, counted before commas)",
    )
    p.add_argument("--data", help="prepared data directory (default: the built-in benchmark)")
    p.add_argument("--train-splits", nargs="+", help="splits to train on (e.g. train2014 val2014)")
    p.add_argument("--eval-split", help="split to evaluate on each epoch ('none' for none)")
    p.add_argument("--model", help="model preset (see `ban info --list`)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (all processes together)")
    p.add_argument("--lr", type=float, help="base learning rate (before the warm-up factors)")
    p.add_argument("--seed", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed-precision autocast")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    _add_device(p)
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any training setting, or model.FIELD for the model (YAML values): "
        "--set model.glimpses=4 --set lr_decay_epochs=[10,12]",
    )
    p.add_argument("--out", help="run directory (default: runs/<model>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from ban import configs, engine
    from ban.tasks import task_for

    runtime = {"device": args.device, "num_workers": args.num_workers, "compile": args.compile}
    flags = {
        "task": args.task,
        "data": args.data,
        "train_splits": args.train_splits,
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "grad_accum": args.grad_accum,
        "amp": args.amp,
        "protocol": args.protocol,
        "compat": args.compat,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.eval_split is not None:  # after the filter: "none" sets None
        flags["eval_split"] = None if args.eval_split.lower() == "none" else args.eval_split
    flags.update(configs.parse_settings(args.set))
    if args.resume:
        if args.recipe or args.config or flags or args.out:
            raise ValueError("--resume takes the run's own config; drop the other settings")
        config = engine.resume_config(args.resume, runtime)
        run_dir = args.resume
    else:
        flags.update({k: v for k, v in runtime.items() if v is not None})
        config = configs.resolve(args.recipe, args.config, flags)
        run_dir = args.out or engine.default_run_dir(config)
    result = engine.train(
        config,
        run_dir,
        resume=bool(args.resume),
        max_steps=args.max_steps,
        progress=not args.quiet,
        argv=sys.argv,
    )
    if result.report is not None:
        print(task_for(config).format_report(result.report))
        if config.task == "vqa":
            _print_family_report(config, result.run_dir)
    if result.status != "finished":
        p = result.progress
        print(
            f"stopped at epoch {p.epoch + 1}, step {p.step_in_epoch}; continue with "
            f"`ban train --resume {result.run_dir}`",
            file=sys.stderr,
        )
    print(f"run directory: {result.run_dir}")
    return 128 + result.signal if result.signal else 0


def _print_family_report(config, run_dir) -> None:
    """On a scene benchmark: the accuracy per question family beside chance."""
    from pathlib import Path

    from ban.metrics import family_report
    from ban.tasks import vqa

    predictions = Path(run_dir) / "predictions.jsonl"
    if predictions.is_file() and config.eval_split == "val2014":
        for line in family_report(vqa.resolve_data(config.data), predictions):
            print(line)


def _add_evaluate(commands) -> None:
    p = commands.add_parser(
        "evaluate", help="official VQA accuracy of a checkpoint on a prepared split"
    )
    p.add_argument("checkpoint", help="a .safetensors file, a run directory, or a release .pth")
    p.add_argument("--data", help="prepared data directory (default: the run's, or the benchmark)")
    p.add_argument("--split", help="split to evaluate (default: val2014; flickr: val)")
    p.add_argument(
        "--task",
        choices=["vqa", "flickr"],
        help="default: flickr for a grounding checkpoint, else vqa",
    )
    p.add_argument("--protocol", choices=["any", "merged"], help="flickr: box protocol (any)")
    p.add_argument(
        "--compat",
        action="store_true",
        default=None,
        help="flickr: the release's phrase positions (default: the run's setting)",
    )
    p.add_argument("--out", help="directory for report.json and predictions.jsonl")
    p.add_argument("--submission", help="also write the VQA server's JSON (question_id, answer)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=1, help="answers per question in predictions")
    _add_device(p)
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed-precision autocast")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--dictionary", help="release checkpoints: the release's dictionary.pkl")
    p.add_argument("--label2ans", help="release checkpoints: trainval_label2ans.pkl")
    p.add_argument(
        "--gallery",
        type=int,
        default=0,
        metavar="N",
        help="also draw N attention pictures (right and wrong answers) and accuracy by question "
        "type, in OUT/gallery",
    )
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    import json
    from pathlib import Path

    from ban import engine
    from ban.checkpoint import load_any
    from ban.files import atomic_write_text, write_jsonl
    from ban.tasks import vqa

    path, run_config = engine.resolve_checkpoint(args.checkpoint)
    device = _device(args)
    if args.task == "flickr" or (args.task is None and _is_grounding(path)):
        return _evaluate_flickr(args, path, run_config, device)
    args.split = args.split or "val2014"
    data = vqa.resolve_data(args.data or (run_config.data if run_config else None), progress=True)
    model = load_any(path, device, args.dictionary, args.label2ans)
    report, rows = vqa.evaluate(
        model,
        data,
        args.split,
        batch_size=args.batch_size,
        device=device,
        amp=args.amp,
        num_workers=args.num_workers,
        top_k=args.top_k,
        progress=True,
    )
    report["checkpoint"] = str(path)
    out = Path(args.out) if args.out else path.parent / f"eval-{args.split}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_jsonl(rows, out / "predictions.jsonl")
    print(vqa.format_report(report))
    print(f"wrote {out / 'report.json'} and {out / 'predictions.jsonl'}")
    if args.submission:
        vqa.write_submission(rows, args.submission)
        print(f"wrote {args.submission} ({len(rows)} answers)")
    if args.gallery > 0:
        from ban import viz
        from ban.predict import Predictor

        gallery = out / "gallery"
        # fp32: the gallery shows the answers of predictions.jsonl
        predictor = Predictor(model, data=data, device=device, precision="fp32")
        entries = vqa.open_split(data, args.split).entries
        paths = viz.gallery(predictor, rows, entries, gallery, args.gallery)
        if "official" in report:
            by_type = report["official"]["by_question_type"]
            paths.append(viz.plot_accuracy_by_type(by_type, entries, gallery))
        print(f"wrote {len(paths)} pictures in {gallery}")
    return 0


def _is_grounding(path) -> bool:
    from ban import checkpoint

    if not checkpoint.is_own_checkpoint(path):
        return False
    return checkpoint.read_metadata(path)["config"].get("task") == "grounding"


def _evaluate_flickr(args, path, run_config, device) -> int:
    """`ban evaluate --task flickr`: Recall@1/5/10, upper bound and per-type recall, named with
    the protocol; report.json and one prediction line per phrase."""
    import json
    from pathlib import Path

    from ban import checkpoint
    from ban.files import atomic_write_text, write_jsonl
    from ban.tasks import grounding

    split = args.split or "val"
    data = grounding.resolve_data(
        args.data or (run_config.data if run_config else None), progress=True
    )
    model = checkpoint.load_any(path, device)
    protocol = args.protocol or (run_config.protocol if run_config else "any")
    compat = args.compat if args.compat is not None else bool(run_config and run_config.compat)
    report, rows = grounding.evaluate(
        model,
        data,
        split,
        protocol=protocol,
        compat=compat,
        batch_size=args.batch_size,
        device=device,
    )
    report["checkpoint"] = str(path)
    name = f"eval-{split}-{protocol}" + ("-compat" if compat else "")  # one folder each
    out = Path(args.out) if args.out else path.parent / name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_jsonl(rows, out / "predictions.jsonl")
    print(grounding.format_report(report))
    print(f"wrote {out / 'report.json'} and {out / 'predictions.jsonl'}")
    return 0


def _add_predict(commands) -> None:
    p = commands.add_parser("predict", help="answer a question about an image of a prepared set")
    p.add_argument("checkpoint", help="a .safetensors file, a run directory, or a release .pth")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image-id", type=int, help="an image of the data directory")
    which.add_argument(
        "--image", help="a new picture (data of `ban data from-images`: featurised alike)"
    )
    p.add_argument("--question", required=True)
    p.add_argument("--data", help="prepared data directory (default: the run's, or the benchmark)")
    p.add_argument("--top-k", type=_positive, default=5, help="answers to show")
    p.add_argument(
        "--boxes", type=_positive, default=3, help="most attended boxes to show per glimpse"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_device(p)
    p.add_argument("--dictionary", help="release checkpoints: the release's dictionary.pkl")
    p.add_argument("--label2ans", help="release checkpoints: trainval_label2ans.pkl")
    _add_precision(p)
    p.set_defaults(func=_run_predict)


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _question(text: str) -> str:
    """`--question`, checked by the rule the API applies (ban.predict.check_question) before
    anything is loaded."""
    from ban.predict import QuestionError, check_question

    try:
        return check_question(text)
    except QuestionError as error:
        raise ValueError(f"--question: {error}") from None


def _run_predict(args) -> int:
    import json

    from ban.predict import Predictor, ignored_words
    from ban.text import MAX_LENGTH

    args.question = _question(args.question)
    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        args.data,
        _device(args),
        args.dictionary,
        args.label2ans,
        precision=args.precision,
    )
    image_id = args.image_id if args.image is None else predictor.add_picture(args.image)
    result = predictor(args.question, image_id, top_k=args.top_k, top_boxes=args.boxes)
    ignored = ignored_words(args.question)
    if ignored:
        print(
            f"note: the model reads the first {MAX_LENGTH} words of a question; "
            f"{len(ignored)} more were left out ({' '.join(ignored)})",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"Q: {args.question}   (read as: {' '.join(result.tokens)})")
    for answer, score in result.answers:
        print(f"  {score:6.3f}  {answer}")
    for g, boxes in enumerate(result.boxes):
        shown = ", ".join(f"#{b.index} {b.box} ({b.weight:.2f})" for b in boxes)
        print(f"  glimpse {g + 1}: {shown}")
    return 0


def _add_visualize(commands) -> None:
    p = commands.add_parser(
        "visualize", help="a PNG of the attention: top boxes per glimpse, region x word maps"
    )
    p.add_argument("checkpoint", help="a .safetensors file or a run directory")
    p.add_argument("--image-id", type=int, required=True, help="an image of the data directory")
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="attention.png", help="the PNG to write")
    p.add_argument("--data", help="prepared data directory (default: the run's, or the benchmark)")
    p.add_argument("--images", help="folder of the pictures (default: RAW/images of the manifest)")
    p.add_argument(
        "--boxes", type=_positive, default=3, help="most attended boxes to draw per glimpse"
    )
    _add_device(p)
    _add_precision(p)
    p.set_defaults(func=_run_visualize)


def _run_visualize(args) -> int:
    from ban import viz
    from ban.files import atomic_write
    from ban.predict import Predictor

    args.question = _question(args.question)
    predictor = Predictor.from_checkpoint(
        args.checkpoint, args.data, _device(args), precision=args.precision
    )
    images = viz.ImageFolder.for_data(predictor.data_dir, args.images)
    picture = viz.visualize(predictor, args.question, args.image_id, images, args.boxes)
    atomic_write(args.out, lambda tmp: picture.save(tmp, format="PNG"))
    print(f"wrote {args.out} ({picture.width} x {picture.height})")
    return 0


def _add_device(p) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")


def _device(args):
    """The torch device of `--device`: as named, or the best available."""
    from ban.distributed import resolve_device

    return resolve_device(args.device)


def _add_precision(p) -> None:
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "int8"),  # ban.inference.PRECISIONS
        default="auto",
        help="the dtype the model answers in (default auto: bf16 on CPUs with bf16 arithmetic, "
        "else int8; fp32 for small models; docs/performance.md)",
    )


def _add_serve(commands) -> None:
    p = commands.add_parser("serve", help="a web page and JSON API to ask questions (loopback)")
    p.add_argument("checkpoint", help="a .safetensors file or a run directory")
    p.add_argument("--data", help="prepared data directory (default: the run's, or the benchmark)")
    p.add_argument("--images", help="folder of the pictures (default: RAW/images of the manifest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    _add_device(p)
    _add_precision(p)
    p.add_argument("--quiet", action="store_true", help="no request log")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds for a request's headers, and its body, to arrive")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=16,
                   help="questions answered in one forward (1: one at a time)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a forward may wait for more questions, under load")  # fmt: skip
    p.add_argument("--image-cache-mb", type=float, default=256.0,
                   help="MiB of the images' visual projections kept, so that further questions "
                   "about an image cost less (0: none; ban.predict.IMAGE_CACHE_BYTES)")  # fmt: skip
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from ban import serve

    if not args.read_timeout > 0:
        raise ValueError(f"--read-timeout: expected seconds above 0, got {args.read_timeout}")
    if args.max_batch < 1 or not args.max_wait_ms >= 0 or not args.image_cache_mb >= 0:
        raise ValueError(
            "--max-batch must be at least 1, --max-wait-ms and --image-cache-mb at least 0"
        )
    try:
        sock = serve.bind(args.host, args.port)  # before the model loads: fail fast
    except OSError as error:
        reason = "the port is in use" if error.errno == errno.EADDRINUSE else error.strerror
        print(f"ban: error: cannot listen on {args.host}:{args.port}: {reason} (choose another "
              "with --port)", file=sys.stderr)  # fmt: skip
        return 2
    app = serve.load_app(args.checkpoint, args.data, args.images, _device(args),
                         args.max_batch, args.max_wait_ms / 1000, args.precision,
                         int(args.image_cache_mb * 2**20))  # fmt: skip
    server = serve.make_server(app, quiet=args.quiet, read_timeout=args.read_timeout, sock=sock)
    host, port = server.server_address[:2]
    print(f"serving {len(app.image_ids)} images on http://{host}:{port}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ban", description="Bilinear Attention Networks for VQA and phrase grounding"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_info(commands)
    _add_convert_official(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_visualize(commands)
    _add_serve(commands)
    data = commands.add_parser("data", help="prepare datasets").add_subparsers(
        dest="data_command", required=True
    )
    _add_data_commands(data)
    features = commands.add_parser("features", help="region features from pictures").add_subparsers(
        dest="features_command", required=True
    )
    _add_features_commands(features)
    return parser


def _add_image_options(p) -> None:
    p.add_argument(
        "--backbone",
        default="efficientnet-lite0",
        help="efficientnet-lite0 (pip install -e '.[images]' in the checkout), or a network file "
        "(.pt2 of "
        "torch.export, or TorchScript) mapping [B, 3, S, S] to [B, D, h, w] (docs/images.md)",
    )
    p.add_argument("--size", type=int, default=320, help="pictures are resized to SIZE x SIZE")
    p.add_argument("--grid", type=int, default=7, help="GRID x GRID cells (regions) per picture")
    p.add_argument("--batch-size", type=int, default=8, help="pictures per forward pass")
    _add_device(p)
    p.add_argument("--fp16", action="store_true", help="store the features as float16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _without_extra(function, *args, **kwargs):
    """`function(...)`, with a missing optional package (`ban[images]`) as an error message."""
    try:
        return function(*args, **kwargs)
    except ImportError as error:
        raise ValueError(str(error)) from error


def _add_features_commands(features) -> None:
    p = features.add_parser(
        "extract", help="a folder of pictures -> one HDF5 feature file (grid cells as regions)"
    )
    p.add_argument("--images", required=True, help="folder of pictures; id: last number in name")
    p.add_argument("--out", required=True, help="the .h5 file to write")
    _add_image_options(p)
    p.set_defaults(func=_run_features_extract)


def _run_features_extract(args) -> int:
    from ban.data.images import extract_features

    info = _without_extra(
        extract_features,
        args.images,
        args.out,
        backbone=args.backbone,
        size=args.size,
        grid=args.grid,
        batch_size=args.batch_size,
        device=_device(args),
        fp16=args.fp16,
        progress=not args.quiet,
    )
    # each skipped picture has already been named in a warning by extract_features
    print(
        f"wrote {args.out}: {info['images']} images, {info['boxes']} regions of "
        f"{info['feature_dim']} features; {len(info['skipped'])} skipped"
    )
    return 0


def _add_data_commands(data) -> None:
    """`ban data ...`: registered by ban/data modules' parser functions below."""
    p = data.add_parser(
        "convert-features", help="bottom-up-attention TSV files -> one HDF5 feature file"
    )
    p.add_argument("tsv", nargs="+", help="TSV files (image_id, image_w, image_h, num_boxes, ...)")
    p.add_argument("--out", required=True, help="the .h5 file to write")
    p.add_argument("--image-ids", help="keep only the image ids listed in this file (one a line)")
    p.add_argument("--fp16", action="store_true", help="store the features as float16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_convert_features)

    p = data.add_parser(
        "prepare", help="raw VQA v2 / features / GloVe / Visual Genome files -> a data directory"
    )
    p.add_argument("raw", help="the raw folder (layout: docs/data.md)")
    p.add_argument("--out", required=True, help="the prepared data directory to write")
    p.add_argument("--splits", nargs="+", help="VQA splits (default: those present in RAW)")
    p.add_argument("--min-answer-count", type=int, default=9, help="answer vocabulary threshold")
    p.add_argument("--glove", help="GloVe text file (default: RAW/glove/glove.*.txt)")
    p.add_argument(
        "--release-unk",
        action="store_true",
        help="no <unk> token: unknown words -> the last word, as the release",
    )
    p.add_argument(
        "--normalize-human-answers",
        action="store_true",
        help="normalise each human answer before scoring (the release does not)",
    )
    p.add_argument(
        "--fix-idf",
        action="store_true",
        help="fix the release's IDF indexing bug in the tf-idf embedding init",
    )
    p.add_argument(
        "--no-tfidf",
        action="store_true",
        help="no tf-idf init: the 'c' embedding is then a frozen copy of GloVe (the release "
        "without --tfidf)",
    )
    p.add_argument(
        "--captions",
        nargs="*",
        help="COCO caption files for the tf-idf co-occurrence (default: "
        "RAW/annotations/captions_{train,val}2017.json, else the 2014 pair, when present; "
        "none when given without files)",
    )
    p.add_argument("--no-vg", action="store_true", help="ignore Visual Genome QA in RAW/vg")
    p.add_argument("--fp16", action="store_true", help="store the features as float16")
    p.add_argument(
        "--allow-missing-features",
        action="store_true",
        help="drop questions whose image has no features instead of failing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=_run_prepare)

    p = data.add_parser(
        "synth", help="generate the built-in scene benchmark (raw files in the real formats)"
    )
    p.add_argument("--out", required=True, help="the raw folder to write")
    p.add_argument("--train-images", type=int, help="train2014 images (default 24000)")
    p.add_argument("--val-images", type=int, help="val2014 images (default 1000)")
    p.add_argument("--test-images", type=int, help="test2015 images (default 250; test-dev: half)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")
    p.add_argument("--feature-dim", type=int, help="region feature size (default 128; real: 2048)")
    p.add_argument("--boxes", default="36", help="boxes per image: a number or 'adaptive' (10-100)")
    p.add_argument("--no-images", action="store_true", help="skip the PNG images")
    p.add_argument(
        "--no-train-images",
        action="store_true",
        help="PNG images of val2014 and test2015 only (as the default benchmark: training reads "
        "the features alone)",
    )
    p.add_argument(
        "--captioned-train-images",
        type=int,
        help="Flickr30k captions for the first N train2014 images only (default: all; the "
        "default benchmark: 4000, what `ban train --task flickr` uses)",
    )
    p.add_argument(
        "--families",
        nargs="+",
        help="question families (default: all but spatial, which BAN cannot see; "
        "docs/benchmark.md): existence counting attribute spatial comparison",
    )
    p.add_argument("--workers", type=int, help="processes (default: the CPU count)")
    p.add_argument(
        "--features",
        choices=("detector", "backbone"),
        default="detector",
        help="region features: the simulated detector (default), or grid cells of a picture "
        "backbone run on the rendered PNGs (the default backbone needs pip install -e "
        "'.[images]' in the checkout)",
    )
    p.add_argument(
        "--backbone",
        help="with --features backbone: efficientnet-lite0 (default) or a network file "
        "(.pt2 / TorchScript), as for `ban features extract`",
    )
    p.add_argument(
        "--size", type=int, default=128, help="with --features backbone: input pixels (128)"
    )
    p.add_argument(
        "--grid", type=int, default=4, help="with --features backbone: grid x grid regions (4)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_synth)

    p = data.add_parser(
        "from-images", help="a folder of pictures + VQA v2 question/answer JSON -> a data directory"
    )
    p.add_argument("--images", required=True, help="folder of pictures; id: last number in name")
    p.add_argument("--questions", required=True, help="questions JSON in VQA v2 form")
    p.add_argument("--annotations", help="annotations (answers) JSON in VQA v2 form")
    p.add_argument("--out", required=True, help="the prepared data directory to write")
    p.add_argument("--split", default="train2014", choices=["train2014", "val2014"])
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="questions on the highest FRACTION of image ids form val2014 (train2014 only)",
    )
    p.add_argument("--min-answer-count", type=int, default=1, help="answer vocabulary threshold")
    p.add_argument("--glove", help="GloVe text file for the word embedding init")
    p.add_argument(
        "--allow-missing-images",
        action="store_true",
        help="drop questions whose picture is absent or does not decode instead of failing",
    )
    _add_image_options(p)
    p.set_defaults(func=_run_from_images)


def _run_from_images(args) -> int:
    from ban.data.from_images import from_images

    out = _without_extra(
        from_images,
        args.images,
        args.questions,
        args.out,
        args.annotations,
        split=args.split,
        val_fraction=args.val_fraction,
        backbone=args.backbone,
        size=args.size,
        grid=args.grid,
        batch_size=args.batch_size,
        device=_device(args),
        min_answer_count=args.min_answer_count,
        glove=args.glove,
        fp16=args.fp16,
        allow_missing_images=args.allow_missing_images,
        progress=not args.quiet,
    )
    print(f"prepared {out}")
    return 0


def _run_convert_features(args) -> int:
    from pathlib import Path

    from ban.data.features import convert_features

    ids = None
    if args.image_ids:
        ids = []
        for n, line in enumerate(Path(args.image_ids).read_text().splitlines(), 1):
            if line.strip():
                try:
                    ids.append(int(line))
                except ValueError:
                    raise ValueError(
                        f"{args.image_ids}:{n}: expected an image id (an integer), got {line!r}"
                    ) from None
    info = convert_features(
        args.tsv, args.out, image_ids=ids, fp16=args.fp16, progress=not args.quiet
    )
    print(f"wrote {args.out}: {info['images']} images, {info['boxes']} boxes")
    if info["missing"]:
        print(
            f"{len(info['missing'])} requested image ids not found, first: {info['missing'][:10]}"
        )
    return 0


def _run_prepare(args) -> int:
    from ban.data.prepare import prepare

    out = prepare(
        args.raw,
        args.out,
        splits=args.splits,
        min_answer_count=args.min_answer_count,
        glove=args.glove,
        release_unk=args.release_unk,
        normalize_human_answers=args.normalize_human_answers,
        fix_idf=args.fix_idf,
        tfidf=not args.no_tfidf,
        captions=args.captions,
        use_vg=not args.no_vg,
        fp16=args.fp16,
        allow_missing_features=args.allow_missing_features,
        progress=not args.quiet,
    )
    print(f"prepared {out}")
    return 0


def _run_synth(args) -> int:
    import time

    from ban.data.scenes import generate

    if args.boxes != "adaptive" and not args.boxes.isdigit():
        raise ValueError(f"--boxes: expected a number or 'adaptive', got {args.boxes!r}")
    start = time.perf_counter()
    sizes = {
        "train_images": args.train_images,
        "val_images": args.val_images,
        "test_images": args.test_images,
        "feature_dim": args.feature_dim,
        "families": args.families,
        "captioned_train_images": args.captioned_train_images,
    }
    out = generate(
        args.out,
        seed=args.seed,
        adaptive=args.boxes == "adaptive",
        num_boxes=36 if args.boxes == "adaptive" else int(args.boxes),
        images=not args.no_images,
        train_pictures=not args.no_train_images,
        workers=args.workers,
        features=args.features,
        backbone=args.backbone,
        backbone_size=args.size,
        grid=args.grid,
        progress=not args.quiet,
        **{name: value for name, value in sizes.items() if value is not None},
    )
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command. The errors of everyday mistakes (a missing or damaged file, a wrong value,
    an unknown image id, a file that cannot be written) print one line, `ban: error: ...`, and
    exit with 2; only a bug shows a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as error:  # FileNotFoundError, PermissionError, ConfigError, ...
        print(f"ban: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ban: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
