"""``dla train``: a tiny DLA language model on a synthetic recall task (docs/training.md).

    dla train --task mqar --policy dla --seed 0 --quick --json run.json

The model is an embedding, two pre-norm blocks of DLAAttention + MLP and a tied head,
trained with AdamW. A progress line (loss, accuracy) goes to stderr; the results (the
configuration, the learning curve, the held-out accuracy) are printed as a summary and,
with ``--json``, written as JSON. ``--quick`` shrinks everything to finish in under a
minute on a laptop CPU. The state count is matched across policies by default: K =
Log-Linear's level count at T, 1 + bit_length(T - 1).
"""

from __future__ import annotations

import json

from . import UsageError, count, number, output_path

QUICK = dict(T=64, pairs=4, d_model=32, n_heads=2, steps=80, batch=16, eval_batches=2,
             lr=3e-3, log_every=5)


def add_arguments(parser) -> None:
    from dla_backends.nn.layer import GATES, POLICIES
    from dla_backends.nn.tasks import TASKS

    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--policy", default="dla", choices=POLICIES)
    parser.add_argument("--seed", type=count(0), default=0)
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    parser.add_argument("--quick", action="store_true", help=f"a run of under a minute ({quick})")
    parser.add_argument("--json", type=output_path(".json"), metavar="PATH",
                        help="write the results here")
    parser.add_argument("--length", "-T", dest="T", type=count(6), help="tokens per sequence")
    parser.add_argument("--pairs", type=count(1), help="mqar: key-value pairs per sequence")
    parser.add_argument("--capacity", type=count(1),
                        help="states K (default: Log-Linear's level count at T)")
    parser.add_argument("--match", action="store_true",
                        help="require --capacity to equal Log-Linear's level count at T")
    parser.add_argument("--backbone", default="mamba2", choices=("mamba2", "gdn", "linear"))
    parser.add_argument("--gate", default="hard", choices=GATES)
    parser.add_argument("--tau", type=number(finite=True))
    parser.add_argument("--temperature", type=number(finite=True, positive=True))
    parser.add_argument("--d-model", type=count(1))
    parser.add_argument("--heads", dest="n_heads", type=count(1))
    parser.add_argument("--head-k-dim", type=count(1),
                        help="key size per head (default d_model / heads)")
    parser.add_argument("--steps", type=count(1))
    parser.add_argument("--batch", type=count(1))
    parser.add_argument("--lr", type=number(finite=True, positive=True))
    parser.add_argument("--threads", type=count(1), help="torch threads (default: torch's)")


def config_from(args):
    """The run's Config: defaults, then --quick, then every option given."""
    from dla_backends.nn.training import Config

    values = dict(QUICK) if args.quick else {}
    for name in ("task", "policy", "seed", "T", "pairs", "capacity", "backbone", "gate", "tau",
                 "temperature", "d_model", "n_heads", "head_k_dim", "steps", "batch", "lr"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    return Config(**values)


def check_config(config, match: bool) -> None:
    """UsageError for what only a combination of options rules out."""
    from dla_ref import fenwick_levels

    levels = fenwick_levels(config.T)
    K = config.capacity or levels
    if config.d_model % config.n_heads:
        raise UsageError(f"--d-model {config.d_model} is not divisible by --heads "
                         f"{config.n_heads}")
    if match and K != levels:
        raise UsageError(f"--capacity {K} does not match Log-Linear's {levels} states at "
                         f"T={config.T} (drop --match, or use --capacity {levels})")
    if config.policy == "loglinear" and K < levels:
        raise UsageError(f"--policy loglinear needs --capacity >= {levels} at T={config.T}")
    if config.gate == "ste" and (config.policy != "dla" or config.backbone == "gdn"):
        raise UsageError("--gate ste needs --policy dla and --backbone mamba2 or linear")
    if config.task == "mqar" and not (config.pairs <= 32 and 4 * config.pairs <= config.T):
        raise UsageError(f"mqar needs --pairs <= 32 and T >= 4 * pairs, got "
                         f"pairs={config.pairs}, T={config.T}")


def run(args) -> int:
    config = config_from(args)
    check_config(config, args.match)
    import torch

    from dla_backends.nn.training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(config)
    curve = result["curve"]
    print(f"{config.task} {config.policy} seed {config.seed}: loss {curve[0]['loss']:.3f} -> "
          f"{curve[-1]['loss']:.3f}, held-out accuracy {result['eval_accuracy']:.3f} "
          f"({result['train_seconds']:.0f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
