"""The ``fastcore`` command line: ``train``, ``data prepare``, ``sample``, ``info``, ``build`` and ``bench``."""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # not installed, or broken: say which
        return f"not importable ({type(exc).__name__})"


def _compiler_line() -> str:
    from fastcore import extension

    cxx = extension._compiler()
    if cxx is None:
        return "none found"
    try:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        first = "version unknown"
    return f"{cxx} ({first})"


def info() -> str:
    """The environment, for bug reports."""
    import torch

    import fastcore
    from fastcore import backends, extension

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    nvcc = shutil.which("nvcc") or "not found"
    lines = [
        f"fastcore      {fastcore.__version__}",
        f"python        {platform.python_version()} ({sys.executable})",
        f"platform      {platform.platform()}",
        f"torch         {torch.__version__} (threads: {torch.get_num_threads()})",
        f"triton        {_version('triton')}" + (" [TRITON_INTERPRET=1]" if backends.triton_interpreting() else ""),
        f"CUDA          {torch.version.cuda or 'none (CPU build of torch)'}; nvcc: {nvcc}",
        f"GPU           {gpu}",
        f"compiler      {_compiler_line()}",
        f"extension     {extension.state()}",
        "backends:",
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in backends.OPS:
        for device in devices:
            ok = backends.available_backends(op, device)
            lines.append(f"  {op:<12} {device:<5} auto -> {ok[0] if ok else 'none'}; available: {', '.join(ok)}")
            for name in backends.OPS[op]:
                reason = backends.why_unavailable(name, device, op=op)
                if reason:
                    lines.append(f"  {'':<12} {'':<5}   {name}: {reason}")
    return "\n".join(lines)


def _train_parser(sub) -> None:
    from fastcore.train.model import PRESETS

    p = sub.add_parser("train", help="train a GPT-style model (default: the tiny preset on the Python stdlib's source)",
                       description="Train a GPT-style language model on one device, or on several ranks under "
                       "torchrun (torchrun --nproc-per-node N -m fastcore train ...). Unset values come from the preset.")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model shape and training defaults: tiny (0.45M parameters, 2-core CPU minutes), small "
                   "(10.9M), gpt2-124m (GPT-2 small); default: %(default)s")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="a prepared directory (fastcore data prepare), or text files/directories/globs/.jsonl to "
                   "prepare with the byte tokenizer into OUT/data; default: the Python standard library's source")
    p.add_argument("--out", default="runs/fastcore",
                   help="run directory: ckpt/, metrics.jsonl; a run without --resume clears its ckpt/ (default: %(default)s)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch on each rank")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step, over all ranks")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr (default: %(default)s)")
    p.add_argument("--warmup", type=int, help="linear warmup steps, then cosine decay (default: the preset's, at most "
                   "--steps / 10)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="on matrices only (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT/ckpt; with the same settings, exactly")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: a fifth of the run)")
    p.add_argument("--eval-iters", type=int, default=20, help="validation batches per evaluation (default: %(default)s)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default: with each evaluation)")
    p.add_argument("--keep-ckpts", type=int, default=3, help="checkpoints kept (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available); under torchrun each rank "
                   "takes its own and --device must be left out or agree")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="TensorBoard logs in OUT/tensorboard (default: when the tensorboard package is installed)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    for name in ("n-layer", "n-head", "n-embd", "block-size"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--norm", choices=["layer", "rms"])
    p.add_argument("--pos", choices=["learned", "rope"])


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare a corpus: fastcore data prepare --input PATH... --out DIR")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("prepare", help="tokenize text files, directories, globs and .jsonl into train.bin/val.bin",
                           description="Read text, drop exact duplicate and empty documents, shuffle the documents, "
                           "tokenize, and write train.bin/val.bin (uint16 or uint32 memmaps) and meta.json to DIR.")
    q.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, directories (text suffixes, recursively), quoted globs ('data/**/*.txt'), "
                   ".jsonl files (their 'text' field)")
    q.add_argument("--out", required=True, metavar="DIR", help="the prepared directory to write")
    q.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte",
                   help="byte: UTF-8 bytes + end-of-text (257 ids); bpe: trained on the corpus with the tokenizers "
                   "library (default: %(default)s)")
    q.add_argument("--vocab", type=int, help="BPE vocabulary size (required with --tokenizer bpe)")
    q.add_argument("--val-fraction", type=float, default=0.05,
                   help="the last fraction of the shuffled token stream kept for validation (default: %(default)s)")
    q.add_argument("--seed", type=int, default=0, help="document shuffle (default: %(default)s)")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="continue a prompt with a trained checkpoint",
                       description="Print the prompt followed by sampled tokens, decoded with the run's tokenizer.")
    p.add_argument("--ckpt", required=True, help="a run directory (its latest checkpoint) or a checkpoint file")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from end-of-text")
    p.add_argument("--tokens", type=int, default=200, help="tokens to sample (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest; 0: all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")


def _run_trainer_command(args) -> int:
    """train / data prepare / sample; a bad input is one line on stderr, not a traceback."""
    from fastcore.train import checkpoint, data
    from fastcore.train.loop import TrainConfig, TrainError, train
    from fastcore.train.sample import sample

    try:
        if args.command == "data":
            data.prepare(args.input, args.out, tokenizer=args.tokenizer, vocab=args.vocab,
                         val_fraction=args.val_fraction, seed=args.seed)
        elif args.command == "sample":
            print(sample(args.ckpt, args.prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                         seed=args.seed, device=args.device))
        else:
            fields = {k: v for k, v in vars(args).items() if k != "command"}
            result = train(TrainConfig(**fields))
            if result["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
                print(f"fastcore train: {result['steps']} steps of a {result['params'] / 1e6:.2f}M-parameter model; "
                      f"final loss {result['loss']:.4f}, val loss {result['val_loss']:.4f}; "
                      f"{result['tokens_per_s']:,.0f} tokens/s; run in {result['out']}")
    except (TrainError, data.DataError, checkpoint.CheckpointError) as exc:
        # One write: under torchrun every rank prints it to one unbuffered stderr, and lines must not interleave.
        sys.stderr.write(f"fastcore {args.command}: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"fastcore {args.command}: interrupted\n")
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from fastcore.bench import cli

        return cli.main(argv[1:], command_line)
    parser = argparse.ArgumentParser(prog="fastcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _data_parser(sub)
    _sample_parser(sub)
    sub.add_parser("info", help="print the environment, the extension state and the backends per op")
    sub.add_parser("build", help="compile the C++/CUDA extension now instead of on first use")
    sub.add_parser("bench", help="run benchmarks, compare with a baseline (fastcore bench -h)")
    args = parser.parse_args(argv)
    if args.command in ("train", "data", "sample"):
        return _run_trainer_command(args)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "build":
        from fastcore import extension

        try:
            extension.load()
        except RuntimeError as exc:
            print(f"fastcore build: {exc}", file=sys.stderr)
            return 1
        print(f"fastcore build: {extension.state()}")
        return 1 if extension.cuda_error() else 0  # built for CPU alone, where CUDA was wanted
    return 2


if __name__ == "__main__":
    sys.exit(main())
