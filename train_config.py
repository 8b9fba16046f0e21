"""How to train: TrainConfig (the schedule, batch layout, intervals and performance switches of a run, each
field documented once and its flag derived from it), the learning-rate schedules it describes, and the
benchmark flags both trainers share (harness.benchmark_scorer reads them)."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from cli import PionError, checked, import_optional, non_negative_float, non_negative_int, positive_int

fraction = checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def setting(help, default=dataclasses.MISSING, flag_type=None, flag=None, **flag_options):
    """A TrainConfig field documented once: `help` is also its command-line flag's help (add_train_config_args).
    flag_type checks the flag's value; flag names it when it is not --<field> (False: no flag; "wsd": a flag
    only for a trainer whose schedule is WSD)."""
    return dataclasses.field(default=default, metadata=dict(help=help, type=flag_type, flag=flag, options=flag_options))


@dataclass
class TrainConfig:
    """How to train: the schedule, batch layout, intervals and performance switches of one run."""
    max_steps: int = setting("optimizer steps of the whole run", flag_type=positive_int)
    lr: float = setting("peak learning rate", flag_type=non_negative_float)
    min_lr: float = setting("learning rate at the end of the schedule", flag_type=non_negative_float)
    warmup_steps: int = setting("steps of linear warmup", flag_type=non_negative_int)
    batch_size: int = setting("sequences per device per micro-step", 8, positive_int)
    grad_accum: int = setting("micro-steps per optimizer step", 1, positive_int)
    seq_len: int = setting("tokens per training sequence", 2048, positive_int)
    schedule: str = setting('"wsd" (warmup, constant, linear decay) or "cosine": each trainer sets its own', "wsd",
                            flag=False)
    decay_frac: float = setting("WSD: the fraction of max_steps spent decaying", 0.2, fraction, flag="wsd")
    weight_decay: float = setting("decoupled weight decay of the matrices (not of the norm weights)", 0.1,
                                  non_negative_float)
    optimizer: str = setting('"adamw", or "muon": torch.optim.Muon on the hidden matrices (--muon_lr) and AdamW '
                             '(--lr) on the embedding and the norm weights, both on the run\'s schedule', "adamw",
                             choices=["adamw", "muon"])
    muon_lr: float = setting("--optimizer muon: Muon's peak learning rate (its min is scaled as --min_lr is to "
                             "--lr)", 0.02, non_negative_float)
    grad_clip: float = setting("max gradient norm, 0 = off", 1.0, non_negative_float)
    log_interval: int = setting("steps between metrics lines", 10, positive_int)
    eval_interval: int = setting("steps between validations", 500, positive_int)
    eval_steps: int = setting("validation batches per evaluation", 20, positive_int)
    save_interval: int = setting("steps between checkpoints", 1000, positive_int)
    keep_last: Optional[int] = setting("keep only the newest N step checkpoints", None, positive_int)
    compile: bool = setting("torch.compile each block", False)
    gradient_checkpointing: bool = setting("keep activations instead of recomputing them in backward (faster, more "
                                           "memory)", True, flag="--no_gradient_checkpointing")
    fsdp: bool = setting("shard parameters with FSDP2 instead of DDP (torchrun)", False)
    fsdp_param_dtype: str = setting("FSDP2 compute dtype (auto: bfloat16 on CUDA, float32 elsewhere)", "auto",
                                    choices=["auto", "bfloat16", "float32"])
    seed: int = setting("seeds the weights, the data order and dropout", 42, non_negative_int)
    allow_data_change: bool = setting("resume although the data differs from the checkpoint's (its sample order "
                                      "then changes)", False)
    allow_optimizer_change: bool = setting("resume with another --optimizer than the checkpoint's (its state then "
                                           "starts from zero)", False)
    keep_final_optimizer: bool = setting("keep the optimizer state in the _final checkpoint too (only to train "
                                         "further from it; it triples the file); step checkpoints always keep it, "
                                         "to resume", False)


def add_train_config_args(parser, defaults, helps=None):
    """A flag per TrainConfig field, defaulting to `defaults` (a TrainConfig) and helped by the field's own text
    or by helps[field name]. A switch that is on by default is turned off by its named flag (--no_...). A WSD
    setting is a flag only where defaults.schedule is WSD (finetune.py's cosine has no use for it)."""
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        help = (helps or {}).get(field.name, meta["help"])
        if meta["flag"] is False or (meta["flag"] == "wsd" and defaults.schedule != "wsd"):
            continue
        flag = None if meta["flag"] == "wsd" else meta["flag"]
        default = getattr(defaults, field.name)
        if field.type == "bool" or field.type is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(flag or f"--{field.name}", dest=field.name, action=action, help=help)
        else:
            parser.add_argument(flag or f"--{field.name}", dest=field.name, type=meta["type"], default=default,
                                help=help, **meta["options"])


def add_benchmark_args(parser):
    """--eval_tasks and its companions: harness benchmarks scored at each eval, in both trainers."""
    parser.add_argument("--eval_tasks", default=None, help="lm-evaluation-harness tasks scored at each eval, e.g. "
                        "hellaswag,arc_easy (pip install lm-eval; default: none)")
    parser.add_argument("--eval_limit", type=positive_int, default=None,
                        help="examples per task at each eval (default: all)")
    parser.add_argument("--eval_include_path", default=None,
                        help="folder of task YAML files of your own for --eval_tasks (default: none)")
    parser.add_argument("--eval_batch_size", type=positive_int, default=16,
                        help="--eval_tasks: contexts per forward (a question's choices share one), as eval.py's "
                             "--batch_size; --batch_size is the training batch")


def benchmark_from_args(args, tokenizer, vocab_size):
    """The scorer of add_benchmark_args' flags (harness.benchmark_scorer: model -> scores), or None without
    --eval_tasks: lm-eval is imported only then, as training needs none of it."""
    if not args.eval_tasks:
        return None
    return import_optional("harness", "--eval_tasks", "lm-eval").benchmark_scorer(
        args.eval_tasks, tokenizer, vocab_size, args.eval_limit, args.eval_include_path, args.eval_batch_size)


# default_lr's reference point: the best AdamW peak lr of Pion's recipe measured at d_model 64 and 128 and 4,096
# tokens a step (bench/bench_recipe.py, docs/performance.md).
REFERENCE_LR, REFERENCE_WIDTH, REFERENCE_TOKENS = 3e-3, 128, 4096


def default_lr(model_config, tokens_per_step):
    """The peak learning rate a run gets when it names none: REFERENCE_LR x (REFERENCE_WIDTH / width) x
    (tokens_per_step / REFERENCE_TOKENS) ** (1/8), to two significant digits, where width is d_model but at least
    REFERENCE_WIDTH; min_lr is a tenth of it.

    Width: Adam's best lr for the hidden matrices falls as 1/width (muP), which GPT-3's and Pythia's published
    sizes follow too (6e-4 at d_model 768, 2e-4 at 2048). Below d_model 128 it stops growing: such a model's
    weights are mostly its embedding, whose best Adam lr does not depend on the width (muP again), and the
    sweeps measured the same best lr at d_model 64 as at 128. Tokens per step: a larger batch's gradient is less
    noisy and takes a larger step, by sqrt(batch) for Adam below the critical batch size and not at all above
    it; an eighth power stays between the two over the 1k-2M tokens a step Pion is run with. The rule gives
    1e-3 for Pion-small at train.py's 262k tokens a step and 9e-4 for GPT-2-small's shape at 0.5M: between
    the conservative published recipes (GPT-3, Pythia: 6e-4) and the aggressive ones (SmolLM2-135M: 3e-3;
    llm.c's GPT-2: 1.8e-3), and within 2.5x of each."""
    width = max(model_config.d_model, REFERENCE_WIDTH)
    lr = REFERENCE_LR * (REFERENCE_WIDTH / width) * (tokens_per_step / REFERENCE_TOKENS) ** 0.125
    return float(f"{lr:.2g}")


def with_default_lr(config, model_config, world_size, say, resumed=None):
    """config with the lr and min_lr it was not given, said aloud: a resumed run's own (resumed: the train_config
    its checkpoint saved), as a rule that changed since must not move a run's learning rate; else default_lr of
    the model and the run's tokens per step, and a tenth of the peak."""
    if config.lr is not None and config.min_lr is not None:
        return config
    saved = resumed if isinstance(resumed, dict) else {}
    is_rate = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
    if config.lr is None and is_rate(saved.get("lr")) and is_rate(saved.get("min_lr")):
        lr, min_lr = saved["lr"], config.min_lr if config.min_lr is not None else saved["min_lr"]
        source = "the resumed run's"
    else:
        tokens_per_step = config.batch_size * config.grad_accum * world_size * config.seq_len
        lr = config.lr if config.lr is not None else default_lr(model_config, tokens_per_step)
        min_lr = config.min_lr if config.min_lr is not None else float(f"{lr / 10:.2g}")
        source = f"d_model {model_config.d_model}, {tokens_per_step:,} tokens a step"
    say(f"learning rate {lr:.3g} to {min_lr:.3g} ({source}; --lr and --min_lr set them)")
    return dataclasses.replace(config, lr=lr, min_lr=min_lr)


def wsd_decay_start(max_steps, decay_frac):
    return max_steps - round(decay_frac * max_steps)


def wsd_lr(step, lr, min_lr, warmup_steps, max_steps, decay_frac):
    """Warmup-stable-decay: linear warmup, constant lr, then linear decay to min_lr over the last decay_frac."""
    decay_start = wsd_decay_start(max_steps, decay_frac)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step < decay_start:
        return lr
    return lr + (min_lr - lr) * (step - decay_start + 1) / (max_steps - decay_start)


def cosine_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to lr, then half a cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def fit_schedule(config, rt):
    """The config with a warmup that fits the run: a default warmup longer than a short run would keep the lr
    near 0 for all of it, so it shrinks to a tenth of the run (said out loud). Warmup running into WSD's
    decay is refused: the schedule would jump down mid-warmup."""
    c = config
    if c.warmup_steps >= c.max_steps:
        warmup = c.max_steps // 10
        rt.print(f"warning: warmup of {c.warmup_steps} steps does not fit in max_steps {c.max_steps}; "
                 f"using {warmup} warmup steps instead")
        c = dataclasses.replace(c, warmup_steps=warmup)
    if c.schedule == "wsd" and c.warmup_steps > wsd_decay_start(c.max_steps, c.decay_frac):
        raise PionError(f"warmup ({c.warmup_steps} steps) runs into the decay, which starts at step "
                        f"{wsd_decay_start(c.max_steps, c.decay_frac)} of {c.max_steps}: lower --warmup_steps or "
                        f"--decay_frac")
    if c.schedule == "wsd" and c.decay_frac > 0 and round(c.decay_frac * c.max_steps) == 0:
        rt.print(f"warning: decay_frac {c.decay_frac} of {c.max_steps} steps is no step: the lr never decays")
    return c


def learning_rate(config, step):
    """The peak learning rate --lr on the schedule at `step`: AdamW's."""
    c = config
    if c.schedule == "cosine":
        return cosine_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps)
    return wsd_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps, c.decay_frac)


def lr_scale(config, step):
    """The schedule at `step` as a fraction of its peak: each optimizer group's peak lr times this is its lr, so
    Muon's and AdamW's learning rates warm up and decay together."""
    return learning_rate(config, step) / config.lr if config.lr > 0 else 0.0
