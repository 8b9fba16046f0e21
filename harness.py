"""Pion as a model of lm-evaluation-harness: any harness task (HellaSwag, ARC, PIQA, your own YAML) on any
Pion checkpoint, scored with Pion's own forward (soft-cap included) and generated with decoding.py's engine.

    lm = PionLM(model, tokenizer)                    # or: lm_eval --model pion --model_args checkpoint=PATH
    results = run_tasks(lm, ["hellaswag"], limit=500)

The scoring is the harness's `hf` backend's (same tokenization, EOS as the context of an empty one, the same
left truncation), computed more cheaply: requests are sorted by length and batched, identical inputs run
once, and the vocabulary projection is computed only at the positions whose next token is scored.
eval.py is the command line; the trainers call run_tasks at each eval interval (--eval_tasks).
"""
import contextlib
import json
import logging
import math
import os
import random
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from chat_template import CHAT_TEMPLATE, render_text
from checkpoint import load_model
from tokenizer import EOS_ID, PAD_ID, load_tokenizer
from cli import PionError, first_line
from decoding import GREEDY, SamplingSettings, TextStream, generate_tokens, seeded_generator

DEFAULT_MAX_GEN_TOKS = 256
SCORE_BYTES = 2**29  # at most about this much soft-capped attention scores per batch (see PionLM._batches)


@register_model("pion")
class PionLM(TemplateLM):
    """A Pion model and its tokenizer behind the harness's LM API.

    model: a Pion (any device, dtype, train or eval mode: scoring runs in eval mode and restores it), or
    None with checkpoint (a path or hf:OWNER/REPO/FILE), as the harness's registry builds it from model_args
    (`get_model("pion").create_from_arg_string("checkpoint=PATH")`). batch_size counts distinct contexts per
    forward: the choices of one question share theirs.
    Under torch.distributed every rank holds the model and the harness gives each rank its share of the
    requests; scores are gathered on rank 0."""

    def __init__(self, model=None, tokenizer=None, checkpoint=None, device="auto", dtype=None, batch_size=16,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, seed=1234, progress=True, tokenizer_path=None, **ignored):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise PionError("PionLM needs a model or a checkpoint")
            model, _, _ = load_model(checkpoint, device or "auto", dtype)
        self.tokenizer_path = tokenizer if isinstance(tokenizer, str) else tokenizer_path  # names request caches
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer, model.config.vocab_size)
        self.model, self.tokenizer = model, tokenizer
        # Requests are tokenized as the harness's hf backend tokenizes them, special-token text matched (its
        # chat template writes <|endoftext|> as text): a copy, since Pion's own tokenizer encodes text as text.
        self.request_tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        self.request_tokenizer.encode_special_tokens = False
        # "auto" (the harness's default) has no meaning here: the batches are small and sorted, so any size works.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self.seed = seed
        self.progress = progress  # the progress bars (the trainers turn them off)
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # ------------------------------------------------------------------------------------------------
    # What the harness asks of a model

    @property
    def device(self):
        return self.model.embed.weight.device

    @property
    def eot_token_id(self):
        return EOS_ID  # also the prefix of an empty context: Pion has no BOS, every document follows an EOS

    @property
    def max_length(self):
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self):
        return f"pion-{os.path.basename(self.tokenizer_path or 'pile_tokenizer.json')}"

    def chat_template(self, chat_template=False):
        return CHAT_TEMPLATE

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The conversation as chat_template.render_text writes it. Without add_generation_prompt a final
        assistant turn is a reply to continue (the harness puts a task's gen_prefix there), as the hf backend
        renders it (continue_final_message): the choices are then not scored after an <|endoftext|>."""
        last_role = chat_history[-1]["role"] if chat_history else None
        return render_text(chat_history, add_generation_prompt,
                           continue_final_message=not add_generation_prompt and last_role == "assistant")

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.request_tokenizer.encode(string).ids  # no BOS or other added tokens

    def tok_decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # torch.distributed for the harness's bookkeeping (request counts, gathered metrics).
    def all_gather(self, tensor):
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered if self.rank == dst else None

    def barrier(self):
        if self.distributed:
            dist.barrier()

    # ------------------------------------------------------------------------------------------------
    # Scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [((context, continuation) or None, context ids, continuation ids)] -> [(log p, is greedy)].

        As in the harness: the scored sequence is context + continuation, its last max_length + 1 tokens
        (longer ones lose their oldest context), and each continuation token is predicted from the positions
        before it. The choices of one question share their context, so it runs once: requests are grouped by
        their prefix (the input up to the position that predicts the first continuation token), prefixes
        run longest first in batches with a KV cache, and each request's remaining continuation tokens run
        against its prefix's cache. A one-token answer costs nothing beyond its question."""
        L = self.max_length
        prefixes, group_of = [], {}  # distinct prefixes, and the group of each
        members = defaultdict(list)  # group -> [(request, its remaining input tokens, its target ids)]
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError("the harness sent an empty continuation")
            tokens = (context + continuation)[-(L + 1):]
            n = len(continuation)
            split = len(tokens) - n  # tokens[:split] predicts the first continuation token
            prefix = tuple(tokens[:split])
            if prefix not in group_of:
                group_of[prefix] = len(prefixes)
                prefixes.append(prefix)
            members[group_of[prefix]].append((i, tokens[split:-1], tokens[split:]))

        results = [None] * len(requests)
        order = sorted(range(len(prefixes)), key=lambda g: -len(prefixes[g]))
        bar = tqdm(total=len(requests), desc="scoring", disable=disable_tqdm or not self.progress or self.rank != 0)
        with eval_mode(self.model):
            for batch in self._batches(order, prefixes, members):
                scored = [(slot, rest, targets) for slot, g in enumerate(batch) for _, rest, targets in members[g]]
                scores = self._score_batch([prefixes[g] for g in batch], scored)
                for (i, _, _), score in zip((m for g in batch for m in members[g]), scores):
                    results[i] = score
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                bar.update(len(scored))
        bar.close()
        return results

    def _batches(self, order, prefixes, members):
        """The groups in order, batch_size at a time, or fewer where a soft-capped model's attention scores
        would pass SCORE_BYTES: with a cache, soft-capped attention builds each row's whole (heads, T, S)
        fp32 score matrix (attention.softcapped_attention_block), which long few-shot contexts make large."""
        c = self.model.config
        capped = c.soft_capped
        batch, used = [], 0
        for g in order:
            P, R = len(prefixes[g]), max(len(rest) for _, rest, _ in members[g])
            need = 4 * c.n_heads * (P + R) * (P + len(members[g]) * R) if capped else 0
            if batch and (len(batch) == self.batch_size or used + need > SCORE_BYTES):
                yield batch
                batch, used = [], 0
            batch.append(g)
            used += need
        if batch:
            yield batch

    def _score_batch(self, prefixes, scored):
        """prefixes: token tuples; scored: [(prefix slot, remaining input ids, target ids)] ->
        [(sum of log p of the targets, all of them greedy)].

        Two forwards: the prefixes (right-padded) into a KV cache, then every request's remaining tokens at
        the positions after its prefix, against a copy of its prefix's cache rows. Only the scored positions
        reach the vocabulary projection: (scored tokens, V), never (B, T, V)."""
        device, model = self.device, self.model
        P = max(map(len, prefixes))
        R = max(len(rest) for _, rest, _ in scored)
        cache = model.new_kv_cache(len(prefixes), P + R)
        prefix_ids = torch.tensor([list(p) + [PAD_ID] * (P - len(p)) for p in prefixes], device=device)
        hidden = model.hidden_states(prefix_ids, cache, torch.arange(P, device=device))
        prefix_len = torch.tensor([len(p) for p in prefixes], device=device)
        slots = torch.tensor([slot for slot, _, _ in scored], device=device)
        # The first target of each request is predicted by its prefix's last position.
        states = [hidden[slots, prefix_len[slots] - 1]]
        targets = [torch.tensor([t[0] for _, _, t in scored], device=device)]
        owner = [torch.arange(len(scored), device=device)]
        longer = [r for r, (_, rest, _) in enumerate(scored) if rest]
        if longer:
            rows = slots[longer]
            cache.k = [k[rows] for k in cache.k]  # one cache row per request, a copy of its prefix's
            cache.v = [v[rows] for v in cache.v]
            rest_ids = torch.tensor([scored[r][1] + [PAD_ID] * (R - len(scored[r][1])) for r in longer], device=device)
            positions = prefix_len[rows][:, None] + torch.arange(R, device=device)
            rest_hidden = model.hidden_states(rest_ids, cache, positions)
            lengths = torch.tensor([len(scored[r][1]) for r in longer], device=device)
            row, column = (torch.arange(R, device=device) < lengths[:, None]).nonzero(as_tuple=True)
            states.append(rest_hidden[row, column])
            targets.append(torch.tensor([t for r in longer for t in scored[r][2][1:]], device=device))
            owner.append(torch.tensor(longer, device=device)[row])
        logits = model.logits(torch.cat(states))
        targets, owner = torch.cat(targets), torch.cat(owner)
        log_probs = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        missed = (logits.argmax(dim=-1) != targets).float()
        totals = torch.zeros(len(scored), dtype=torch.float64, device=device).index_add_(0, owner, log_probs.double())
        misses = torch.zeros(len(scored), device=device).index_add_(0, owner, missed)
        return [(float(total), not bool(miss)) for total, miss in zip(totals.tolist(), misses.tolist())]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Whole-text log-likelihood (perplexity tasks): windows of max_length tokens, each token scored once,
        the first after EOS, as the harness's rolling windows define."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), prefix_token=EOS_ID, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (log_p, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += log_p
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------------------
    # Generation

    def generate_until(self, requests, disable_tqdm=False):
        """Continue each context until one of its stop strings (or <|endoftext|>, or max_gen_toks), through
        generate_tokens and TextStream: the text returned ends before the stop string."""
        groups = defaultdict(list)  # requests with the same generation settings decode together
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm or not self.progress or self.rank != 0)
        with eval_mode(self.model):
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1])
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
                context_room = self.max_length - max_new
                if context_room < 1:
                    raise PionError(f"max_gen_toks {max_new} leaves no room for a context in max_seq_len "
                                    f"{self.max_length}")
                settings = sampling_settings(kwargs)
                prompts = {i: self.tok_encode(requests[i].args[0])[-context_room:] for i in members}
                members = sorted(members, key=lambda i: -len(prompts[i]))
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    texts = self._generate([prompts[i] for i in batch], max_new, settings, until)
                    for i, text in zip(batch, texts):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, prompts, max_new_tokens, settings, until):
        generator = None if settings is GREEDY else seeded_generator(self.device, self.seed)
        streams = [TextStream(self.tokenizer, until) for _ in prompts]
        for column in generate_tokens(self.model, prompts, max_new_tokens, settings, generator):
            for stream, token in zip(streams, column.tolist()):
                if not stream.finished:
                    stream.add(token)
            if self._all_ranks_done(all(stream.finished for stream in streams)):
                break
        for stream in streams:
            stream.finish()  # a row that ran out of tokens: release what was held back
        return [stream.text for stream in streams]

    def _all_ranks_done(self, done):
        """Whether every rank's batch is finished. Ranks decode in step (a sharded model's forward is a
        collective), so a rank whose rows are done keeps stepping until the others are too."""
        if not self.distributed:
            return done
        flag = torch.tensor(float(done), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


@contextlib.contextmanager
def eval_mode(model):
    """Inference mode and model.eval() for a block, restoring the model's mode after (the trainers call
    the harness mid-run)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def sampling_settings(gen_kwargs):
    """The harness's generation kwargs -> SamplingSettings: greedy unless do_sample with a temperature > 0."""
    temperature = float(gen_kwargs.get("temperature", 1.0) or 0.0)
    if not gen_kwargs.get("do_sample", False) or temperature == 0:
        return GREEDY
    return SamplingSettings(temperature=temperature, top_k=int(gen_kwargs.get("top_k", 0) or 0),
                            top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0))


# ----------------------------------------------------------------------------------------------------
# Running tasks


def task_manager(tasks, include_path=None):
    """A TaskManager that knows every name in `tasks` and has their data, else a PionError (an unknown name,
    data the hub cannot give: no network, HF_DATASETS_OFFLINE). Checked before any model is scored; the
    data stays in the datasets cache for the evaluation itself. Indexing the harness's own thousands of
    tasks takes seconds, so when include_path alone has them all only that folder is indexed."""
    from lm_eval.tasks import TaskManager
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = None
    if include_path is not None:
        if not os.path.isdir(include_path):
            raise PionError(f"--include_path {include_path} is not a folder")
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or not all(name in manager.all_tasks for name in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    own_tasks = task_files(include_path) if include_path is not None else {}
    if unknown:
        # The harness skips a YAML file it cannot parse: the task in it is then merely "unknown".
        broken = next(((path, error) for path, error in own_tasks.items() if isinstance(error, Exception)), None)
        if broken:
            raise PionError(f"{broken[0]} is not valid YAML ({first_line(broken[1])}), so its task is unknown")
        raise PionError(f"unknown task(s) {', '.join(unknown)}: see `lm_eval ls tasks` for the harness's "
                        f"names, or add YAML files with --include_path")
    for path, config in own_tasks.items():
        if isinstance(config, dict) and config.get("task") in tasks and "include" not in config:
            required = ["doc_to_text"] + (["doc_to_choice"] if config.get("output_type") == "multiple_choice" else [])
            missing = [field for field in required if field not in config]
            if missing:  # the harness fails on the first example with a bare TypeError
                raise PionError(f"{path}: task {config['task']} has no {' or '.join(missing)}")
    try:
        manager.load(list(tasks))
    except (ConnectionError, FileNotFoundError) as e:
        raise PionError(f"cannot load the data of {', '.join(tasks)} ({first_line(e)}); check your network "
                        f"and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, or run it where the data is cached")
    except Exception as e:  # a task's own configuration: a bad Jinja template, a field of the wrong type, ...
        raise PionError(f"cannot build task(s) {', '.join(tasks)} from their configuration "
                        f"({type(e).__name__}: {first_line(e)})")
    return manager


def task_files(include_path):
    """{path: the parsed config, or the exception that parsing raised} of the task YAML files under
    include_path. The harness's `!function` tags are read as plain strings: only the fields matter here."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: None)
    found = {}
    for root, _, names in os.walk(include_path):
        for name in sorted(names):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(root, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        found[path] = yaml.load(f, Loader=Loader)
                except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                    found[path] = e
    return found


def run_tasks(lm, tasks, manager=None, limit=None, num_fewshot=None, apply_chat_template=False,
              log_samples=False, bootstrap_iters=1000):
    """Evaluate lm on the named tasks (manager: from task_manager) -> the harness's results dict on rank 0,
    None on the other ranks."""
    from lm_eval import simple_evaluate
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager or task_manager(tasks), limit=limit,
                           num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                           log_samples=log_samples, bootstrap_iters=bootstrap_iters)


def metric_values(results):
    """The results dict's numbers as {"eval/<task>/<metric>": value}: stderr left out, and the filter named
    only when it is not the default ("none")."""
    values = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            if math.isfinite(value):
                values[f"eval/{task}/{name}"] = float(value)
    return values


# ----------------------------------------------------------------------------------------------------
# Benchmarks during training


def benchmark_scorer(tasks, tokenizer, vocab_size, limit=None, include_path=None, batch_size=16):
    """A TrainingRun's benchmark for --eval_tasks (the trainers' flags, train_config.add_benchmark_args):
    model -> {"eval/<task>/<metric>": value} on rank 0 ({} elsewhere). Task names and data are checked now,
    before training starts. Under torchrun each rank scores its share of the requests. The harness seeds the
    global RNGs; they are restored after each run, so a run with benchmarks trains exactly as one without."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if tokenizer.get_vocab_size() > vocab_size:
        raise PionError(f"--eval_tasks: the tokenizer's {tokenizer.get_vocab_size()} ids exceed the model's "
                        f"vocab_size {vocab_size}")
    manager = task_manager(names, include_path)

    def benchmark(model):
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state(), \
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            with unsharded(model):
                lm = PionLM(model, tokenizer, batch_size=batch_size, progress=False)
                results = run_tasks(lm, names, manager, limit=limit, bootstrap_iters=0)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
            if saved[3] is not None:
                torch.cuda.set_rng_state_all(saved[3])
        return metric_values(results) if results is not None else {}

    return benchmark


@contextlib.contextmanager
def unsharded(model):
    """An FSDP2-sharded model with every parameter gathered, for a whole harness run.

    An FSDP forward is a collective, so ranks would have to run exactly as many forwards as each other, but
    each rank's share of the requests batches differently. Gathered once and kept gathered (no resharding
    after each forward, as FSDP's docs suggest for evals), the forwards run locally. Afterwards the shards
    come back and the blocks reshard after their forwards again, as in training (the root never does)."""
    sharded = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "set_reshard_after_forward")]
    if not sharded:
        yield
        return
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)
